"""Hostile files (issue 12, cases 4-7 and 10): FIFOs, /dev/zero links, non-UTF-8 names, decompression bombs,
paths out of the images folder, hand-edited manifests, corrupted shards.

Every test is bounded in time: a regression fails by timeout, never hangs. Calls that could block on a FIFO
run in a thread joined with a timeout (the FIFO's writer end is opened in clean-up to release a stuck
reader); calls that could read /dev/zero forever run in a subprocess that is killed at its deadline.
"""

import contextlib
import csv
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tensorflow as tf
from PIL import Image

from dual_encoder import files
from dual_encoder.atomic import file_sha256
from dual_encoder.cli import main
from dual_encoder.config import DataConfig
from dual_encoder.data import tfrecords
from dual_encoder.data.sources import DataError, Reason
from dual_encoder.search import Hit, SearchResult, write_grid
from tests.unit.index.helpers import save_tiny_model, write_image, write_images

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30  # seconds any one call may take before it counts as hung
BAD_NAME = b"caf\xe9.png"  # Latin-1 "café.png": not UTF-8


# -- helpers ------------------------------------------------------------------------------------------


def bounded(function, *args, timeout: float = DEADLINE):
    """`function(*args)` in a daemon thread; fails the test (instead of hanging it) past `timeout`."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} hung for {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cli(*args: str, timeout: float = DEADLINE) -> int:
    return bounded(main, [str(a) for a in args], timeout=timeout)


def cli_in_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in its own process, killed at `timeout`: for inputs an old implementation read forever."""
    code = "import sys; from dual_encoder.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"dual-encoder {' '.join(map(str, args))} did not finish in {timeout} s")


@contextlib.contextmanager
def fifo(path: Path):
    """A named pipe at `path`; on exit its writer end is opened and closed, so a reader stuck on it returns."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def tree_digest(root: Path, exclude: Path | None = None) -> dict[str, str]:
    """Every regular file under `root` (except under `exclude`) -> sha256: to prove nothing else changed."""
    digests = {}
    for folder, _, names in os.walk(os.fsencode(root)):
        for name in names:
            path = os.path.join(folder, name)
            if exclude is not None and path.startswith(os.fsencode(exclude)):
                continue
            if exclude is not None and name == b"." + os.fsencode(Path(exclude).name) + b".lock":
                continue  # the writer's lock file beside the output (see dual_encoder.atomic.writer_lock)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as stream:
                    digests[os.fsdecode(path)] = hashlib.sha256(stream.read()).hexdigest()
    return digests


def huge_png(path: Path, side: int = 20_000) -> Path:
    """A 1-bit PNG of side x side pixels (400 megapixels at 20000): ~50 KB on disk, 1.2 GB as RGB."""
    Image.new("1", (side, side)).save(path, format="PNG", optimize=True)
    return path


def good_images(folder: Path, count: int = 4) -> list[tuple[str, str]]:
    """`count` PNGs in `folder` and a caption for each, as CSV rows."""
    return [(p.name, f"a picture number {i}") for i, p in enumerate(write_images(folder, count))]


def write_rows(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as stream:
        stream.write("image,caption\n")
        csv.writer(stream).writerows(rows)
    return path


def prepare_csv(pairs: Path, images: Path, output: Path, *extra) -> list:
    """The arguments of `prepare --source csv` (quiet)."""
    return ["prepare", "--source", "csv", "--input", pairs, "--images-dir", images, "--output", output, "--quiet",
            *extra]  # fmt: skip


def build_folder(model_dir: Path, images: Path, output: Path) -> list:
    """The arguments of `index build --images` (quiet)."""
    return ["index", "build", "--model", model_dir, "--images", images, "--output", output, "--quiet"]


def manifest_of(prepared: Path) -> dict:
    return json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))


def skipped_reasons(prepared: Path) -> dict[str, str]:
    return {Path(s["item"]).name: s["reason"] for s in manifest_of(prepared)["skipped"]}


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model", seed=0)


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 4)
    return folder


# -- case 4: FIFOs --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fifo_in_an_image_folder_is_skipped_by_prepare(tmp_path, photos):
    for name, caption in good_images(photos):
        (photos / name).with_suffix(".txt").write_text(caption)
    before = tree_digest(tmp_path)
    with fifo(photos / "pipe.png"), fifo(photos / "other.txt"):
        code = cli("prepare", "--source", "folder", "--images-dir", photos, "--output", tmp_path / "out", "--quiet")
    assert code == 0
    assert skipped_reasons(tmp_path / "out")["pipe.png"] == Reason.NOT_REGULAR == "not a regular file"
    assert manifest_of(tmp_path / "out")["counts"]["images"] == 4
    assert tree_digest(tmp_path, exclude=tmp_path / "out") == before


@pytest.mark.timeout(60)
def test_csv_row_pointing_at_a_fifo_is_skipped_by_prepare(tmp_path, photos):
    pairs = write_rows(tmp_path / "pairs.csv", good_images(photos) + [("pipe.png", "a pipe")])
    with fifo(photos / "pipe.png"):
        code = cli("prepare", "--source", "csv", "--input", pairs, "--images-dir", photos,
                   "--output", tmp_path / "out", "--quiet")  # fmt: skip
    assert code == 0
    assert skipped_reasons(tmp_path / "out") == {"pipe.png": "not a regular file"}


@pytest.mark.timeout(120)
def test_fifo_in_a_gallery_is_skipped_by_index_build_and_add(tmp_path, photos, model_dir, capsys):
    with fifo(photos / "pipe.png"):
        assert cli(*build_folder(model_dir, photos, tmp_path / "ix")) == 0
        err = capsys.readouterr().err
        assert "pipe.png: not a regular file (a named pipe)" in err
        (photos / "later").mkdir()
        write_image(photos / "later" / "new.png", seed=99)
        with fifo(photos / "later" / "pipe2.png"):
            assert cli("index", "add", "--index", tmp_path / "ix", "--images", photos, "--quiet") == 0
    assert "pipe2.png: not a regular file" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_fifo_as_the_list_file_or_annotation_file_is_one_line_error(tmp_path, photos, model_dir, capsys):
    with fifo(tmp_path / "list.txt") as listing:
        err = one_line_error(capsys, cli("index", "build", "--model", model_dir, "--list", listing,
                                         "--output", tmp_path / "ix", "--quiet"))  # fmt: skip
        assert "not a regular file (a named pipe)" in err
    with fifo(tmp_path / "pairs.csv") as pairs:
        err = one_line_error(capsys, cli(*prepare_csv(pairs, photos, tmp_path / "o")))
        assert "pairs.csv: not a regular file (a named pipe)" in err


@pytest.mark.timeout(60)
def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    """`stat` said regular, then the file became a FIFO: O_NONBLOCK opens it at once and fstat refuses it."""
    monkeypatch.setattr(files, "check_regular", lambda path: None)
    with fifo(tmp_path / "swapped.png") as path:
        with pytest.raises(files.FileRefusedError, match="not a regular file"):
            bounded(files.read_bytes, path)


@pytest.mark.timeout(60)
def test_checksums_refuse_fifos_and_devices(tmp_path):
    (tmp_path / "zero.bin").symlink_to("/dev/zero")
    with fifo(tmp_path / "pipe.bin") as pipe:
        for path in (pipe, tmp_path / "zero.bin", "/dev/zero"):
            with pytest.raises(files.FileRefusedError, match="not a regular file"):
                bounded(file_sha256, path)
    (tmp_path / "big.bin").write_bytes(b"x" * 2000)
    with pytest.raises(files.FileRefusedError, match="too large"):
        files.sha256(tmp_path / "big.bin", max_bytes=1000)
    with pytest.raises(files.FileRefusedError, match="too large"):
        files.read_bytes(tmp_path / "big.bin", max_bytes=1000)
    assert files.read_bytes(tmp_path / "big.bin", max_bytes=2000) == b"x" * 2000


# -- case 5: symlinks to /dev/zero (a subprocess each: an old implementation reads until killed) ---------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dev_zero_symlink_is_skipped_by_prepare(tmp_path, photos):
    (photos / "x.png").symlink_to("/dev/zero")
    rows = good_images(photos)
    for name, caption in rows:
        (photos / name).with_suffix(".txt").write_text(caption)
    pairs = write_rows(tmp_path / "pairs.csv", rows + [("x.png", "endless zeros")])
    run = cli_in_subprocess("prepare", "--source", "csv", "--input", pairs, "--images-dir", photos,
                            "--output", tmp_path / "out", "--quiet")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert skipped_reasons(tmp_path / "out") == {"x.png": "not a regular file"}
    folder = ["prepare", "--source", "folder", "--images-dir", photos, "--output", tmp_path / "f", "--quiet"]
    run = cli_in_subprocess(*folder)
    assert run.returncode == 0, run.stderr
    assert skipped_reasons(tmp_path / "f") == {"x.png": "not a regular file"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_dev_zero_symlink_is_skipped_by_index_build(tmp_path, photos, model_dir):
    (photos / "x.png").symlink_to("/dev/zero")
    run = cli_in_subprocess(*build_folder(model_dir, photos, tmp_path / "ix"))
    assert run.returncode == 0, run.stderr
    assert "x.png: not a regular file (a character device)" in run.stderr
    assert "4 items" in run.stdout


# -- case 7: file names that are not UTF-8 --------------------------------------------------------------


def _bad_name_image(folder: Path) -> bytes:
    path = os.path.join(os.fsencode(folder), BAD_NAME)
    with open(path, "wb") as stream:
        Image.new("RGB", (16, 16), "red").save(stream, format="PNG")
    with open(path[:-4] + b".txt", "wb") as stream:
        stream.write(b"a red square")
    return path


@pytest.mark.timeout(60)
def test_non_utf8_file_name_is_skipped_by_prepare_folder(tmp_path, photos):
    for name, caption in good_images(photos):
        (photos / name).with_suffix(".txt").write_text(caption)
    _bad_name_image(photos)
    assert cli("prepare", "--source", "folder", "--images-dir", photos, "--output", tmp_path / "out", "--quiet") == 0
    skipped = manifest_of(tmp_path / "out")["skipped"]
    assert [(s["item"], s["reason"]) for s in skipped] == [("caf\ufffd.png", "file name is not valid UTF-8")]


@pytest.mark.timeout(120)
def test_non_utf8_file_name_is_skipped_by_index_build(tmp_path, photos, model_dir, capsys):
    _bad_name_image(photos)
    assert cli(*build_folder(model_dir, photos, tmp_path / "ix")) == 0
    assert "caf\ufffd.png: file name is not valid UTF-8" in capsys.readouterr().err
    assert len((tmp_path / "ix" / "items.jsonl").read_text(encoding="utf-8").splitlines()) == 4


# -- case 6: decompression bombs -------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_400_megapixel_png_is_skipped_by_index_build_and_add_with_low_memory(tmp_path, photos, model_dir, capsys):
    huge_png(photos / "bomb.png")
    assert (photos / "bomb.png").stat().st_size < 200_000
    peak = _peak_rss_mb()
    assert cli(*build_folder(model_dir, photos, tmp_path / "ix")) == 0
    assert "bomb.png: too large (" in capsys.readouterr().err
    huge_png(photos / "bomb2.png")
    assert cli("index", "add", "--index", tmp_path / "ix", "--images", photos, "--quiet") == 0
    assert "bomb2.png: too large" in capsys.readouterr().err
    assert _peak_rss_mb() - peak < 400  # decoding one of them takes 1.2 GB


@pytest.mark.timeout(60)
def test_400_megapixel_png_is_skipped_by_prepare(tmp_path, photos):
    huge_png(photos / "bomb.png")
    pairs = write_rows(tmp_path / "pairs.csv", good_images(photos) + [("bomb.png", "a bomb")])
    code = cli(*prepare_csv(pairs, photos, tmp_path / "out"))
    assert code == 0 and skipped_reasons(tmp_path / "out") == {"bomb.png": "too large"}


@pytest.mark.timeout(60)
def test_contact_sheet_survives_a_huge_image_and_a_fifo_among_the_hits(tmp_path):
    hits = [
        Hit(1, 0, str(write_image(tmp_path / "ok.png", seed=1)), 0.9),
        Hit(2, 1, str(huge_png(tmp_path / "bomb.png")), 0.8),
    ]
    with fifo(tmp_path / "pipe.png") as pipe:
        hits.append(Hit(3, 2, str(pipe), 0.7))
        sheet = bounded(write_grid, SearchResult("q", "q", hits), tmp_path / "grid.png", 40, 3)
    with Image.open(sheet) as image:
        assert image.getpixel((4 + 44 + 20, 20 + 4 + 20)) == (211, 211, 211)  # the bomb: a grey tile
        assert image.getpixel((4 + 88 + 20, 20 + 4 + 20)) == (211, 211, 211)  # the pipe: a grey tile
        assert image.getpixel((4 + 20, 20 + 4 + 20)) != (211, 211, 211)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_exported_image_encoder_refuses_huge_images_and_answers_an_empty_batch(tmp_path, model_dir):
    from dual_encoder.export import export_image_encoder
    from dual_encoder.models import load_model

    model = load_model(model_dir)
    export_image_encoder(model, tmp_path / "image_encoder", max_pixels=DataConfig().max_image_pixels)
    encode = tf.saved_model.load(str(tmp_path / "image_encoder")).signatures["serving_default"]
    empty = encode(image_bytes=tf.constant([], tf.string))["embeddings"]
    assert empty.shape == (0, 16) and empty.dtype == tf.float32
    ok = write_image(tmp_path / "ok.png", seed=3).read_bytes()
    assert encode(image_bytes=tf.constant([ok]))["embeddings"].shape == (1, 16)
    bomb = huge_png(tmp_path / "bomb.png").read_bytes()
    peak = _peak_rss_mb()
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 64000000 pixels"):
        encode(image_bytes=tf.constant([ok, bomb]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF or BMP"):
        encode(image_bytes=tf.constant([b"plain text"]))
    assert _peak_rss_mb() - peak < 400


# -- case 10: paths outside --images-dir, CSV line numbers ---------------------------------------------


@pytest.mark.timeout(60)
def test_csv_and_jsonl_paths_outside_the_images_dir_are_skipped_unless_allowed(tmp_path, photos, capsys):
    secret = write_image(tmp_path / "private" / "secret.png", seed=7)
    rows = good_images(photos) + [(str(secret), "absolute"), ("../private/secret.png", "dot dot")]
    pairs = write_rows(tmp_path / "pairs.csv", rows)
    args = ["prepare", "--source", "csv", "--input", pairs, "--images-dir", photos, "--quiet"]
    assert cli(*args, "--output", tmp_path / "out") == 0
    skipped = manifest_of(tmp_path / "out")["skipped"]
    assert sorted((s["item"], s["reason"]) for s in skipped) == [
        ("../private/secret.png", "outside images dir"),
        (str(secret), "outside images dir"),
    ]
    assert manifest_of(tmp_path / "out")["counts"]["images"] == 4
    assert cli(*args, "--output", tmp_path / "allowed", "--allow-outside") == 0
    assert manifest_of(tmp_path / "allowed")["counts"]["images"] == 6
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": i, "caption": c}) for i, c in rows), encoding="utf-8")
    code = cli("prepare", "--source", "jsonl", "--input", jsonl, "--images-dir", photos, "--quiet",
               "--output", tmp_path / "from-jsonl")  # fmt: skip
    assert code == 0 and manifest_of(tmp_path / "from-jsonl")["counts"]["images"] == 4


@pytest.mark.timeout(60)
def test_csv_error_line_numbers_name_the_bad_line(tmp_path, photos, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('image,caption\n000.png,one\n,no image\n"001.png,"broken\n', encoding="utf-8")
    err = one_line_error(capsys, cli("prepare", "--source", "csv", "--input", pairs, "--images-dir", photos,
                                     "--output", tmp_path / "out", "--quiet"))  # fmt: skip
    assert "line 4" in err
    pairs.write_text("image,caption\n000.png,one\n,no image\n001.png,two\n", encoding="utf-8")
    assert cli(*prepare_csv(pairs, photos, tmp_path / "out")) == 0
    assert [(s["item"], s["reason"]) for s in manifest_of(tmp_path / "out")["skipped"]] == [("pairs.csv:3", "bad row")]


# -- case 10: hand-edited index manifests -------------------------------------------------------------


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("hostile-index")
    write_images(root / "photos", 4)
    assert main(["index", "build", "--model", str(model_dir), "--images", str(root / "photos"),
                 "--output", str(root / "ix"), "--quiet"]) == 0  # fmt: skip
    return root / "ix"


def _edited_copy(built_index: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "ix"
    copy.mkdir()
    for path in built_index.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


MANIFEST_EDITS = {
    "files emptied": (lambda m: m.update(files={}), "does not list"),
    "items not listed": (lambda m: m["files"].pop("items.jsonl"), "does not list ['items.jsonl']"),
    "passwd listed": (
        lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
        "not part of an index",
    ),
    "files a list": (lambda m: m.update(files=["embeddings.npy"]), "'files' is not an object"),
    "entry without size": (lambda m: m["files"]["items.jsonl"].pop("bytes"), "needs 'sha256'"),
    "count is text": (lambda m: m.update(count="many"), "manifest says float32['many', 16]"),
    "model is a string": (lambda m: m.update(model="somewhere"), "malformed"),
    "config is a list": (lambda m: m.update(config=[1, 2]), "bad config or kind"),
    "format_version is text": (lambda m: m.update(format_version="1"), "format version '1' is not supported"),
    "not an object": (lambda m: m.clear(), "not a dual_encoder.image_index manifest"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_hand_edited_index_manifests_are_one_line_errors(built_index, tmp_path, capsys, case):
    edit, message = MANIFEST_EDITS[case]
    index = _edited_copy(built_index, tmp_path, edit)
    err = one_line_error(capsys, cli("search", "a red circle", "--index", index))
    assert any(part in err for part in message.split("|")), err


@pytest.mark.timeout(60)
def test_manifest_that_is_not_json_is_a_one_line_error(built_index, tmp_path, capsys):
    index = _edited_copy(built_index, tmp_path, lambda m: None)
    (index / "manifest.json").write_bytes(b"\xff{not json")
    assert "unreadable" in one_line_error(capsys, cli("search", "a red circle", "--index", index))


# -- case 10: corrupted prepared shards -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_corrupted_shard_is_not_up_to_date_and_readers_name_it(tmp_path, photos, model_dir, capsys):
    pairs = write_rows(tmp_path / "pairs.csv", good_images(photos, 8))
    prepare = ["prepare", "--source", "csv", "--input", pairs, "--images-dir", photos,
               "--output", tmp_path / "data", "--quiet", "--set", "validation_fraction=0.25"]  # fmt: skip
    assert cli(*prepare) == 0
    capsys.readouterr()
    shard = tmp_path / "data" / manifest_of(tmp_path / "data")["splits"]["train"]["shards"][0]["file"]
    original = shard.read_bytes()
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size: only the checksum tells
    shard.write_bytes(bytes(corrupted))

    # Readers refuse it with one line naming the shard (verified once when the split is opened).
    index_build = ["index", "build", "--model", model_dir, "--data", tmp_path / "data", "--split", "train",
                   "--output", tmp_path / "ix", "--quiet"]  # fmt: skip
    err = one_line_error(capsys, cli(*index_build))
    assert "checksum mismatch" in err and shard.name in err
    err = one_line_error(capsys, cli("evaluate", "--model", model_dir, "--data", tmp_path / "data", "--split", "train"))
    assert shard.name in err
    assert not (tmp_path / "ix").exists()

    # prepare does not call it up to date: it writes the dataset again, and the shard is whole.
    assert cli(*prepare) == 0
    assert "up to date" not in capsys.readouterr().out
    assert shard.read_bytes() == original
    assert cli(*prepare) == 0 and "up to date" in capsys.readouterr().out
    assert cli(*index_build) == 0


@pytest.mark.timeout(60)
def test_a_prepared_manifest_naming_files_outside_its_folder_is_refused(tmp_path, photos):
    pairs = write_rows(tmp_path / "pairs.csv", good_images(photos))
    assert cli(*prepare_csv(pairs, photos, tmp_path / "data")) == 0
    manifest = manifest_of(tmp_path / "data")
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not a file name inside the dataset"):
        tfrecords.verify_dataset(tmp_path / "data")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["[1, 2]", '{"format_version": 1}', '{"format_version": 1, "splits": {"train": 5}}'])
def test_malformed_prepared_manifests_are_one_line_errors(tmp_path, photos, model_dir, capsys, text):
    pairs = write_rows(tmp_path / "pairs.csv", good_images(photos))
    assert cli(*prepare_csv(pairs, photos, tmp_path / "data")) == 0
    capsys.readouterr()
    (tmp_path / "data" / "manifest.json").write_text(text)
    code = cli("index", "build", "--model", model_dir, "--data", tmp_path / "data", "--split", "train",
               "--output", tmp_path / "ix", "--quiet")  # fmt: skip
    assert "manifest" in one_line_error(capsys, code)
