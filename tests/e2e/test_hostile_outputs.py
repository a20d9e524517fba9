"""Issue 12 through the command line on a tiny real run: outputs of another kind, `--overwrite`, two writers
as two real processes, run folders that do not match, empty validation splits.

A refusal is exit code 2 with one line, and the tree it was pointed at hashes the same before and after.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dual_encoder.cli import main
from dual_encoder.index import ImageIndex
from tests.tiny import tiny_config
from tests.unit.index.helpers import write_images
from tests.unit.test_safe_outputs import one_line_error, tree_hash

REPO = Path(__file__).resolve().parents[2]


def _prepare(root: Path, output: Path, *extra: str) -> int:
    return main(["prepare", "--source", "csv", "--input", str(root / "shapes" / "captions.csv"),
                 "--images-dir", str(root / "shapes" / "images"), "--output", str(output), "--quiet", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    assert main(["synthetic", "--output", str(root / "shapes"), "--num-images", "40", "--image-size", "32"]) == 0
    assert _prepare(root, root / "prepared", "--set", "validation_fraction=0.25") == 0
    tiny_config(epochs=1, tensorboard=False).save(root / "tiny.json")
    assert main(["train", "--data", str(root / "prepared"), "--output", str(root / "run"),
                 "--preset", str(root / "tiny.json"), "--quiet"]) == 0  # fmt: skip
    assert main(["index", "build", "--model", str(root / "run"), "--data", str(root / "prepared"),
                 "--split", "train", "--output", str(root / "index"), "--quiet"]) == 0  # fmt: skip
    foreign = root / "project"  # a user's folder that happens to hold the markers' names
    (foreign / "src").mkdir(parents=True)
    (foreign / "README.txt").write_text("my project")
    (foreign / "src" / "app.js").write_text("console.log('hi')")
    (foreign / "manifest.json").write_text('{"name": "my-app", "version": "1.0.0"}')
    (foreign / "export.json").write_text('{"exported_at": "yesterday"}')
    (foreign / "config.json").write_text('{"theme": "dark"}')
    return root


def _refusals(root: Path) -> dict[str, tuple[list[str], str]]:
    model, images = str(root / "run"), str(root / "shapes" / "images")
    build = ["index", "build", "--model", model, "--images", images, "--output"]
    export = ["export", "--index", str(root / "index"), "--output"]
    train = ["train", "--data", str(root / "prepared"), "--preset", str(root / "tiny.json"), "--quiet", "--output"]
    return {
        "index build over a prepared dataset": (build + [str(root / "prepared")], "is a prepared dataset, not an index"),
        "index build over a prepared dataset, --overwrite": (
            build + [str(root / "prepared"), "--overwrite"], "is a prepared dataset, not an index"),
        "index build over a run folder": (build + [str(root / "run")], "is a training run folder, not an index"),
        "index build over a user's folder": (build + [str(root / "project")], "is a non-empty directory that is not an index"),
        "index build over an index, no --overwrite": (build + [str(root / "index")], "already holds an index: pass --overwrite"),
        "prepare over an index, --overwrite": (
            ["prepare", "--source", "csv", "--input", str(root / "shapes" / "captions.csv"), "--images-dir", images,
             "--output", str(root / "index"), "--overwrite"], "is an index, not a prepared dataset"),
        "prepare over a user's folder": (
            ["prepare", "--source", "csv", "--input", str(root / "shapes" / "captions.csv"), "--images-dir", images,
             "--output", str(root / "project")], "not a prepared dataset: not replacing it"),
        "export over a user's folder, --overwrite": (
            export + [str(root / "project"), "--overwrite"], "is a non-empty directory that is not an export"),
        "export over a prepared dataset": (export + [str(root / "prepared")], "is a prepared dataset, not an export"),
        "train into a user's folder, --restart": (
            train + [str(root / "project"), "--restart"], "is a non-empty directory that is not a training run folder"),
        "train into an index": (train + [str(root / "index")], "is an index, not a training run folder"),
        "train into a file": (train + [str(root / "tiny.json")], "exists and is not a directory"),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_outputs_of_another_kind_or_not_ours_are_refused_and_untouched(workspace, capsys):
    for name, (args, message) in _refusals(workspace).items():
        before = tree_hash(workspace)
        capsys.readouterr()
        assert main(args) == 2, name
        one_line_error(capsys, message)
        assert tree_hash(workspace) == before, name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overwrite_replaces_only_an_output_of_its_own_kind(workspace, tmp_path, capsys):
    root = workspace
    # prepare: unchanged inputs are a no-op without --overwrite; changed inputs need it.
    assert _prepare(root, tmp_path / "prepared") == 0
    before = tree_hash(tmp_path)
    capsys.readouterr()
    assert _prepare(root, tmp_path / "prepared") == 0
    assert "is up to date" in capsys.readouterr().out
    assert _prepare(root, tmp_path / "prepared", "--set", "split_seed=3") == 2
    one_line_error(capsys, "already holds a prepared dataset: pass --overwrite to replace it")
    assert tree_hash(tmp_path) == before
    assert _prepare(root, tmp_path / "prepared", "--set", "split_seed=3", "--overwrite") == 0
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["artifact"] == "dual_encoder.prepared_dataset"

    # index build: an index (also one written before manifests named their kind) is replaced with --overwrite.
    shutil.copytree(root / "index", tmp_path / "index")
    manifest_path = tmp_path / "index" / "manifest.json"
    legacy = json.loads(manifest_path.read_text())
    del legacy["artifact"]
    manifest_path.write_text(json.dumps(legacy))
    build = ["index", "build", "--model", str(root / "run"), "--images", str(root / "shapes" / "images"),
             "--output", str(tmp_path / "index"), "--quiet"]  # fmt: skip
    assert main(build) == 2
    one_line_error(capsys, "already holds an index")
    (tmp_path / "index" / "NOTES.txt").write_text("a user's file beside our manifest")
    before = tree_hash(tmp_path)
    assert main(build + ["--overwrite"]) == 2
    one_line_error(capsys, "holds an index and files that are not part of it (NOTES.txt): not replacing it")
    assert tree_hash(tmp_path) == before
    (tmp_path / "index" / "NOTES.txt").unlink()
    assert main(build + ["--overwrite"]) == 0
    assert len(ImageIndex.load(tmp_path / "index")) == 40


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_index_add_processes_at_once_keep_both_batches_with_unique_ids(workspace, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(workspace / "index", index)
    count = len(ImageIndex.load(index))
    batches = [write_images(tmp_path / "batch-a", 6, first_seed=100), write_images(tmp_path / "batch-b", 6, first_seed=200)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUAL_ENCODER_LOCK_TIMEOUT": "240"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-m", "dual_encoder.cli", "index", "add", "--index", str(index),
             "--images", str(batch[0].parent), "--quiet"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for batch in batches
    ]
    outputs = [writer.communicate(timeout=280) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    after = ImageIndex.load(index)
    paths = set(after.items.paths)
    assert len(after) == count + 12
    assert all(str(path) in paths for batch in batches for path in batch)
    assert len(set(after.items.ids)) == len(after)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resuming_a_run_with_another_config_or_dataset_is_refused_and_restart_starts_afresh(workspace, tmp_path, capsys):
    root = workspace
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    assert _prepare(root, tmp_path / "other-data", "--set", "validation_fraction=0.5") == 0
    train = ["train", "--preset", str(root / "tiny.json"), "--output", str(run), "--quiet"]
    before = tree_hash(tmp_path)
    capsys.readouterr()

    assert main(train + ["--data", str(root / "prepared"), "--set", "heads.embed_dim=8", "--set", "loss=siglip"]) == 2
    one_line_error(capsys, "another config", "model.heads.embed_dim 16 -> 8", "model.loss.name \"clip\" -> \"siglip\"", "--restart")
    assert main(train + ["--data", str(tmp_path / "other-data")]) == 2
    one_line_error(capsys, "was trained on another dataset", str(root / "prepared"))
    assert tree_hash(tmp_path) == before

    assert main(train + ["--data", str(root / "prepared")]) == 0  # same config and data: resumes (already done)
    assert "Resuming" in capsys.readouterr().out
    assert main(train + ["--data", str(tmp_path / "other-data"), "--set", "heads.embed_dim=8", "--restart"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["model"]["heads"]["embed_dim"] == 8 and record["dataset"]["dir"] == str(tmp_path / "other-data")
    assert len(json.loads((run / "history.json").read_text())) == 1  # a fresh run, not a continued one


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_empty_validation_split_is_refused_before_training_and_by_evaluate(workspace, tmp_path, capsys):
    root = workspace
    assert _prepare(root, tmp_path / "no-validation", "--set", "validation_fraction=0") == 0
    (tmp_path / "one").mkdir()
    shutil.copy(sorted((root / "shapes" / "images").glob("*.png"))[0], tmp_path / "one" / "a.png")
    (tmp_path / "one.csv").write_text("image,caption\na.png,a red circle\n")
    assert main(["prepare", "--source", "csv", "--input", str(tmp_path / "one.csv"), "--images-dir",
                 str(tmp_path / "one"), "--output", str(tmp_path / "one-image"), "--quiet"]) == 0  # fmt: skip
    for data in ("no-validation", "one-image"):
        before = tree_hash(tmp_path)
        capsys.readouterr()
        assert main(["train", "--data", str(tmp_path / data), "--output", str(tmp_path / "run"),
                     "--preset", str(root / "tiny.json"), "--quiet"]) == 2  # fmt: skip
        one_line_error(capsys, "train: the 'validation' split", "holds no images", "validation_fraction")
        assert main(["evaluate", "--model", str(root / "run"), "--data", str(tmp_path / data)]) == 2
        one_line_error(capsys, "evaluate: the 'validation' split", "holds no images")
        assert tree_hash(tmp_path) == before and not (tmp_path / "run").exists()
