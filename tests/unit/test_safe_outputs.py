"""Issue 12 without a model: artifact kinds, refusals, the writer lock, unwritable outputs, settings checks.

Every refusal is one line with exit code 2 and leaves the tree exactly as it was (hashed before and after).
"""

import errno
import hashlib
import json
import threading
import time
from pathlib import Path

import filelock
import pytest

from dual_encoder import atomic
from dual_encoder.atomic import (
    EXPORT,
    FEATURE_CACHE,
    INDEX,
    PREPARED_DATASET,
    RUN,
    LockTimeoutError,
    OutputError,
    atomic_directory,
    check_replaceable,
    identify,
    writer_lock,
)
from dual_encoder.cli import main
from dual_encoder.config import ALLOWED, Config, ConfigError
from dual_encoder.errors import DualEncoderError


def tree_hash(root: Path) -> dict[str, str]:
    """Every path under `root` with the sha256 of its bytes (folders as "dir"): equal means nothing changed."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _artifact(folder: Path, kind, content: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / kind.marker).write_text(json.dumps(content))
    return folder


# --- kinds -------------------------------------------------------------------------------------------------------

LEGACY = {  # markers as the code before kinds wrote them
    INDEX: {"format": "dual_encoder.image_index", "format_version": 1, "count": 1, "dim": 2, "files": {},
            "next_id": 1, "model": {}, "kind": "exact"},
    PREPARED_DATASET: {"format_version": 1, "fingerprint": "ab", "source": {}, "counts": {}, "splits": {}},
    EXPORT: {"model": {}, "signatures": {}, "image_size": 32, "sequence_length": 8},
}  # fmt: skip


@pytest.mark.parametrize("kind", LEGACY, ids=lambda k: k.name)
def test_artifacts_of_today_and_of_before_kinds_are_recognised(tmp_path, kind):
    assert identify(_artifact(tmp_path / "new", kind, {**kind.stamp(), "anything": 1})) == kind
    assert identify(_artifact(tmp_path / "old", kind, LEGACY[kind])) == kind


def test_a_legacy_run_folder_is_recognised_by_its_config(tmp_path):
    (tmp_path / "run").mkdir()
    Config().save(tmp_path / "run" / "config.json")
    assert identify(tmp_path / "run") == RUN


@pytest.mark.parametrize("content", [{"hello": 1}, {"format_version": 1}, "not json", {"artifact": "someone.else"}])
def test_a_folder_merely_holding_a_manifest_is_not_ours(tmp_path, content):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
    (folder / "README.txt").write_text("precious")
    before = tree_hash(tmp_path)
    assert identify(folder) is None
    for overwrite in (False, True):
        with pytest.raises(DualEncoderError, match="is a non-empty directory that is not an index: not replacing it"):
            check_replaceable(folder, INDEX, overwrite=overwrite)
    assert tree_hash(tmp_path) == before


def test_another_kind_is_refused_even_with_overwrite_and_the_same_kind_only_with_it(tmp_path):
    dataset = _artifact(tmp_path / "prepared", PREPARED_DATASET, LEGACY[PREPARED_DATASET])
    with pytest.raises(DualEncoderError, match="is a prepared dataset, not an index: not replacing it"):
        check_replaceable(dataset, INDEX, overwrite=True)
    with pytest.raises(DualEncoderError, match="already holds a prepared dataset: pass --overwrite"):
        check_replaceable(dataset, PREPARED_DATASET)
    check_replaceable(dataset, PREPARED_DATASET, overwrite=True)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", INDEX)  # empty and absent folders are new paths
    check_replaceable(tmp_path / "absent", INDEX)


# --- the writer lock ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_second_writer_waits_then_fails_with_one_line(tmp_path):
    target = tmp_path / "ix"
    holder = filelock.FileLock(str(tmp_path / ".ix.lock"))  # another writer (its own file descriptor)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match=r"being written by another process .* over 0.3 s"):
            with writer_lock(target, timeout=0.3):
                pass
        assert time.monotonic() - started >= 0.3
    finally:
        holder.release()
    with writer_lock(target, timeout=0.3):  # free again
        pass


@pytest.mark.timeout(30)
def test_the_lock_lives_beside_the_folder_and_survives_the_swap(tmp_path):
    target = tmp_path / "cache"
    order = []

    def second_writer():
        with writer_lock(target, timeout=20):
            order.append("second")

    with writer_lock(target):
        thread = threading.Thread(target=second_writer)
        thread.start()
        for _ in range(2):  # two swaps while the lock is held
            with atomic_directory(target, FEATURE_CACHE, overwrite=True) as staging:
                (staging / FEATURE_CACHE.marker).write_text("x")
        time.sleep(0.3)
        order.append("first")
    thread.join(20)
    assert order == ["first", "second"]
    assert (tmp_path / ".cache.lock").is_file() and not (target / ".cache.lock").exists()


def test_the_lock_timeout_is_configurable(monkeypatch):
    monkeypatch.setenv(atomic.LOCK_TIMEOUT_ENV, "2.5")
    assert atomic.lock_timeout() == 2.5
    monkeypatch.setenv(atomic.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(DualEncoderError, match="not a number of seconds"):
        atomic.lock_timeout()


# --- unwritable outputs ------------------------------------------------------------------------------------------


def _prepare_args(tmp_path, output):
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a red circle\n")
    return ["prepare", "--source", "csv", "--input", str(tmp_path / "pairs.csv"), "--images-dir", str(tmp_path),
            "--output", str(output), "--quiet"]  # fmt: skip


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_unwritable_output_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("a regular file")
    output = tmp_path / "file" / "sub" if where == "under a file" else Path("/proc/dual-encoder-test/out")
    args = _prepare_args(tmp_path, output)
    before = tree_hash(tmp_path)
    assert main(args) == 2
    one_line_error(capsys, f"cannot write {output}: ")
    assert tree_hash(tmp_path) == before


def test_a_full_disk_mid_write_is_one_line_and_keeps_nothing(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write .*out: No space left on device"):
        with atomic_directory(tmp_path / "out", EXPORT) as staging:
            (staging / "half").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- settings ----------------------------------------------------------------------------------------------------

BAD_SETTINGS = {
    "batch_size=abc": "train.batch_size",
    "batch_size=0": "an integer >= 1",
    "batch_size=-1": "an integer >= 1",
    "batch_size=2.5": "an integer >= 1",
    "learning_rate=fast": "a number > 0",
    "learning_rate=-1": "a number > 0",
    "epochs=abc": "train.epochs",
    "epochs=0": "an integer >= 1",
    "dropout=5": "dropout=5 is not allowed: expected a number >= 0 and < 1",
    "heads.dropout=5": "model.heads.dropout=5 is not allowed: expected a number >= 0 and < 1",
    "embed_dim=0": "model.heads.embed_dim",
    "text.width=0": "model.text.width=0 is not allowed: expected an integer >= 1",
    "text.widht=64": "model.text (the small_transformer text tower) has backbone, vocabulary_size, sequence_length, width",
    "image.nope=1": "model.image (the small_cnn image tower) has backbone, size, width, weights, trainable",
    "towers.width=1": "give section.key, with a section of data, train, index, serve, image, text, paired, heads, loss",
    "embed_batch_size=0": "index.embed_batch_size",
    "mixed_precision=maybe": "train.mixed_precision=\"maybe\" is not allowed: expected true or false",
    "loss=triplet": "one of clip, soft_target, siglip",
    "kind=lsh": "one of exact, hnsw, ivf, ivfpq, auto",
    "dtype=int8": "one of float32, float16",
    "text_backbone=gpt": "one of small_transformer, keras_hub, tf_hub",
    "validation_fraction=1": "data.validation_fraction",
    "learning_rate=NaN": "a number > 0",
}


@pytest.mark.parametrize("setting, message", BAD_SETTINGS.items(), ids=BAD_SETTINGS.keys())
def test_a_bad_setting_is_one_line_naming_the_key_and_what_is_allowed(tmp_path, capsys, setting, message):
    before = tree_hash(tmp_path)
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--set", setting]) == 2
    one_line_error(capsys, message)
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON (line 1"),
        ('{"train": [1, 2]}', "config section 'train' must be a JSON object"),
        ('{"model": "big"}', "config section 'model' must be a JSON object"),
        ("[1, 2]", "a config must be a JSON object"),
        ('{"train": {"batch_size": "abc"}}', "train.batch_size"),
    ],
)
def test_a_bad_preset_file_is_one_line_naming_it(tmp_path, capsys, text, message):
    (tmp_path / "preset.json").write_text(text)
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"),
                 "--preset", str(tmp_path / "preset.json")]) == 2  # fmt: skip
    one_line_error(capsys, "preset.json", message)


def test_good_settings_still_apply():
    config = Config().with_overrides(["learning_rate=1e-4", "image_weights=null", "validation_fraction=0", "port=80"])
    assert (config.train.learning_rate, config.model.image.weights, config.data.validation_fraction) == (1e-4, None, 0)
    with pytest.raises(ConfigError):
        Config.from_dict({"serve": {"port": 70000}})


def test_the_allowed_choices_are_the_registries():
    """The config names the choices without importing TensorFlow; this keeps them equal to the real registries."""
    from dual_encoder.index.ann import AUTO_KIND, IndexKind
    from dual_encoder.index.store import DTYPES
    from dual_encoder.losses import LOSSES
    from dual_encoder.model_config import HEAD_KINDS, TEXT_FAMILIES, HeadsConfig, LossConfig, image_backbones, text_backbones
    from dual_encoder.models.image_encoder import IMAGE_BACKBONES
    from dual_encoder.models.layers import TEXT_POOLINGS
    from dual_encoder.models.text_encoder import TEXT_ENCODERS

    assert sorted(image_backbones()) == sorted(IMAGE_BACKBONES)
    assert sorted(text_backbones()) == sorted(TEXT_ENCODERS)
    offered = {backbone: set(family.allowed["pooling"].choices) for family in TEXT_FAMILIES for backbone in family.backbones}
    assert offered == {backbone: set(tower.poolings) for backbone, tower in TEXT_ENCODERS.items()}
    assert set().union(*offered.values()) == set(TEXT_POOLINGS)
    assert set(LossConfig.allowed["name"].choices) == set(LOSSES)
    assert HeadsConfig.allowed["kind"].choices == HEAD_KINDS
    assert set(ALLOWED["index.dtype"].choices) == set(DTYPES)
    assert set(ALLOWED["index.kind"].choices) == {k.value for k in IndexKind} | {AUTO_KIND}


# --- run folders -------------------------------------------------------------------------------------------------


def test_a_run_folder_written_before_run_json_resumes_with_its_config_and_is_refused_with_another(tmp_path, capsys):
    from dual_encoder.training.run_folder import RunFolderError, check_run_folder

    run = tmp_path / "run"
    run.mkdir()
    Config().save(run / "config.json")  # what today's trainer leaves: config.json, no run.json
    check_run_folder(run, Config(), "f" * 64)
    assert "predates dataset fingerprints" in capsys.readouterr().err
    other = Config().with_overrides(["batch_size=32", "epochs=3", "index.kind=exact"])  # index settings do not count
    with pytest.raises(RunFolderError, match=r"another config \(train.batch_size 64 -> 32; train.epochs 20 -> 3\)"):
        check_run_folder(run, other, "f" * 64)
    check_run_folder(run, other, "f" * 64, restart=True)


@pytest.mark.parametrize("record", ["{not json", "[1, 2]", '{"config": "abc"}'])
def test_an_unreadable_run_record_is_one_line_and_restart_still_works(tmp_path, record):
    from dual_encoder.training.run_folder import RunFolderError, check_run_folder

    run = tmp_path / "run"
    run.mkdir()
    Config().save(run / "config.json")
    (run / "run.json").write_text(record)
    with pytest.raises(RunFolderError, match="unreadable run record .*pass --restart"):
        check_run_folder(run, Config(), "f" * 64)
    check_run_folder(run, Config(), "f" * 64, restart=True)


def test_restart_removes_what_a_run_wrote_and_nothing_else(tmp_path):
    from dual_encoder.training.run_folder import _clear

    run = tmp_path / "run"
    for name in ("backup/ckpt-1.index", "logs/events", "model/fingerprint.json", "history.json", "run.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "my-notes.txt").write_text("keep me")
    _clear(run)
    assert sorted(p.name for p in run.iterdir()) == ["my-notes.txt"]


def test_our_manifest_beside_a_users_files_is_not_replaced_even_with_overwrite(tmp_path):
    folder = _artifact(tmp_path / "prepared", PREPARED_DATASET, {**PREPARED_DATASET.stamp()})
    for name in ("train-00000.tfrecord", "train.jsonl"):
        (folder / name).write_text("x")
    (folder / "features").mkdir()
    check_replaceable(folder, PREPARED_DATASET, overwrite=True)  # only what prepare writes (and the cache)
    (folder / "src").mkdir()
    (folder / "README.txt").write_text("precious")
    with pytest.raises(DualEncoderError, match=r"files that are not part of it \(README.txt, src\)"):
        check_replaceable(folder, PREPARED_DATASET, overwrite=True)
