"""The command line on a tiny run: every subcommand, and bad input as one line with exit code 2."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from dual_encoder.cli import app, main
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["synthetic", "--output", str(root / "shapes"), "--num-images", "48", "--image-size", "32",
                 "--queries", "--min-relevant", "3"]) == 0
    assert main(["prepare", "--source", "csv", "--input", str(root / "shapes" / "captions.csv"),
                 "--images-dir", str(root / "shapes" / "images"), "--output", str(root / "prepared"),
                 "--metadata", str(root / "shapes" / "scenes.jsonl"),
                 "--set", "validation_fraction=0.25", "--quiet"]) == 0
    tiny_config(epochs=1, tensorboard=False).save(root / "tiny.json")
    assert main(["train", "--data", str(root / "prepared"), "--output", str(root / "run"),
                 "--preset", str(root / "tiny.json"), "--quiet"]) == 0
    return root


@pytest.mark.slow
def test_evaluate_index_search_add_remove(workspace, capsys, tmp_path):
    root = workspace
    capsys.readouterr()
    assert main(["evaluate", "--model", str(root / "run"), "--data", str(root / "prepared")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"t2i_recall@1", "i2t_recall@10", "t2i_median_rank", "top100_accuracy"} <= set(metrics)

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    images = sorted((root / "shapes" / "images").glob("*.png"))
    for image in images[:10]:
        (gallery / image.name).write_bytes(image.read_bytes())
    (gallery / "notes.jpg").write_text("not an image")
    assert main(["index", "build", "--model", str(root / "run"), "--images", str(gallery),
                 "--output", str(root / "index"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("10 items") and "notes.jpg" in out.err

    assert main(["search", "--index", str(root / "index"), "find images of a red circle", "-k", "3", "--json",
                 "--grid", str(tmp_path / "grid.png")]) == 0
    results = json.loads(capsys.readouterr().out.split("\ngrid:")[0])
    # One shape however many queries: a list of results, each with its hits.
    assert [set(r) for r in results] == [{"query", "normalized_query", "hits"}]
    assert results[0]["query"] == "find images of a red circle" and results[0]["normalized_query"] == "a red circle"
    hits = results[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3] and set(hits[0]) == {"rank", "id", "path", "score", "caption"}
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["search", "--index", str(root / "index"), "a red circle", "two blue squares", "-k", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["a red circle", "two blue squares"]
    assert all(set(r) == {"query", "normalized_query", "hits"} and len(r["hits"]) == 2 for r in results)
    # Without -k: the config's serve.default_k, as the API and the page.
    assert main(["search", "--index", str(root / "index"), "a red circle", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["hits"]) == 10
    assert main(["search", "--index", str(root / "index"), "a red circle", "--json", "--set", "default_k=4"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["hits"]) == 4

    for image in images[10:12]:
        (gallery / image.name).write_bytes(image.read_bytes())
    assert main(["index", "add", "--index", str(root / "index"), "--images", str(gallery), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("12 items")
    (gallery / images[0].name).unlink()
    assert main(["index", "remove", "--index", str(root / "index"), "--missing"]) == 0
    assert capsys.readouterr().out.startswith("11 items")


@pytest.mark.slow
def test_judged_query_sets_from_the_generator_score_a_split_and_an_index(workspace, capsys, tmp_path):
    root = workspace
    assert (root / "shapes" / "queries.tsv").is_file() and (root / "shapes" / "qrels.txt").is_file()
    assert main(["synthetic-queries", "--data", str(root / "prepared"), "--split", "validation",
                 "--output", str(tmp_path / "held-out"), "--min-relevant", "2"]) == 0
    assert "judged queries" in capsys.readouterr().out

    assert main(["evaluate", "--model", str(root / "run"), "--data", str(root / "prepared"),
                 "--queries", str(tmp_path / "held-out" / "queries.tsv")]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["captions"] == "full" and "t2i_recall@1" in report
    groups = report["query_set"]["groups"]
    assert "shape" in groups and {"P@10", "R-precision", "recall@100", "nDCG@10", "MAP"} <= set(groups["shape"])
    assert "chance" in out.err and "all queries" in out.err

    assert main(["index", "build", "--model", str(root / "run"), "--images", str(root / "shapes" / "images"),
                 "--output", str(tmp_path / "index"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--index", str(tmp_path / "index"), "--queries", str(root / "shapes" / "queries.tsv")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gallery"] == 48 and report["queries_without_relevant"] == 0
    assert report["all"]["queries"] == len((root / "shapes" / "queries.tsv").read_text().splitlines()) - 1

    (tmp_path / "bad.txt").write_text("shape-000 000001.png\n")
    assert main(["evaluate", "--index", str(tmp_path / "index"), "--queries", str(root / "shapes" / "queries.tsv"),
                 "--qrels", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt:1: expected 'query_id 0 doc_id relevance'" in capsys.readouterr().err
    assert main(["evaluate", "--index", str(tmp_path / "index")]) == 2
    assert main(["synthetic-queries", "--data", str(tmp_path / "index"), "--output", str(tmp_path / "q")]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "--index", "/nonexistent/index", "a red circle"], "does not exist"),
        (["prepare", "--source", "coco", "--images-dir", ".", "--output", "/tmp/x"], "--input is required"),
        (["train", "--data", ".", "--output", "/tmp/x", "--set", "no_such_key=1"], "unknown config key"),
        (["train", "--data", ".", "--output", "/tmp/x", "--preset", "no-such-preset"], "unknown preset"),
        (["index", "remove", "--index", "/tmp/x"], "--missing"),
        (["synthetic", "--output", "/tmp/x", "--captions", "5,2"], "min_captions <= max_captions"),
        (["synthetic", "--output", "/tmp/x", "--captions", "many"], "--captions"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_synthetic_writes_as_many_captions_per_image_as_asked(tmp_path):
    assert main(["synthetic", "--output", str(tmp_path), "--num-images", "4", "--image-size", "32", "--captions", "2,2"]) == 0
    rows = (tmp_path / "captions.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 8


def test_annotation_file_that_is_not_json_exits_2(tmp_path, capsys):
    (tmp_path / "captions.json").write_text("{not json")
    code = main(["prepare", "--source", "coco", "--input", str(tmp_path / "captions.json"),
                 "--images-dir", str(tmp_path), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "captions.json" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main(["search", "--index", "x", "q", "-k", "0"]) == 2
    assert main(["search", "--index", "x", "q", "-k", "abc"]) == 2
    assert main(["prepare", "--source", "pdf", "--images-dir", ".", "--output", "x"]) == 2
    assert main(["train", "--data", ".", "--output", "x", "--strategy", "bogus"]) == 2
    assert main(["index", "build", "--model", "m", "--output", "x", "--images", ".", "--kind", "flat"]) == 2


# -- the command line itself: help, flags, choices, version, quiet start-up, what prepare skipped -------------------


def _help(capsys, *command: str) -> str:
    assert main([*command, "--help"]) == 0
    return capsys.readouterr().out


def test_help_lists_the_commands_in_workflow_order(capsys):
    lines = _help(capsys).split("Commands:")[1].splitlines()
    names = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert names == ["synthetic", "synthetic-queries", "prepare", "model", "train", "evaluate", "index", "search",
                     "classify", "serve", "export", "demo"]


def _commands():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from ((name, sub) for sub in command.commands)
        else:
            yield (name,)


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_flags_take_no_value_and_choices_are_listed_in_help(command, capsys):
    text = _help(capsys, *command)
    assert "<bool>" not in text and "--no-" not in text  # a flag shows as a flag: present or absent
    choices = {
        ("prepare",): "<coco|csv|jsonl|folder>",
        ("train",): "<auto|default|mirrored|multi_worker|tpu>",
        ("evaluate",): "<train|validation>",
        ("index", "build"): "<exact|hnsw|ivf|auto>",
        ("index", "dedup"): "<auto|exact|faiss>",
    }
    if command in choices:
        assert choices[command] in " ".join(text.split())


def test_json_is_a_flag_that_consumes_no_query():
    search = typer.main.get_command(app).commands["search"]
    params = search.make_context("search", ["--index", "ix", "--json", "a red circle"]).params
    assert params["json_"] is True and list(params["query"]) == ["a red circle"]
    params = search.make_context("search", ["--index", "ix", "a red circle"]).params
    assert params["json_"] is False


def test_choices_are_the_library_registries():
    from dual_encoder.cli import DedupMethod, IndexKind, Split, Strategy
    from dual_encoder.index.dedup import DedupMethod as Methods
    from dual_encoder.data.prepare import SPLITS
    from dual_encoder.index.ann import IndexKind as Kinds
    from dual_encoder.training.distribute import STRATEGY_NAMES

    assert [s.value for s in Split] == list(SPLITS)
    assert [s.value for s in Strategy] == list(STRATEGY_NAMES)
    assert {k.value for k in IndexKind} == {k.value for k in Kinds} | {"auto"}
    assert [m.value for m in DedupMethod] == [m.value for m in Methods]


def test_dedup_defaults_are_the_library_defaults():
    from dual_encoder.cli import DEDUP_PIXEL_THRESHOLD, DEDUP_THRESHOLD
    from dual_encoder.index import dedup

    assert (DEDUP_THRESHOLD, DEDUP_PIXEL_THRESHOLD) == (dedup.DEFAULT_THRESHOLD, dedup.DEFAULT_PIXEL_THRESHOLD)


def test_version_comes_from_the_package_metadata(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dual-encoder {importlib.metadata.version('dual_encoder')}"


def test_prepare_names_the_first_skipped_files_on_the_console(tmp_path, capsys):
    from tests.unit.index.helpers import write_image

    rows = [(write_image(tmp_path / f"ok{i}.png", seed=i).name, f"picture {i}") for i in range(2)]
    rows += [(f"gone{i}.png", "missing") for i in range(7)]
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    assert main(["prepare", "--source", "csv", "--input", str(tmp_path / "pairs.csv"), "--images-dir", str(tmp_path),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "7 skipped: 7 missing" in out.out
    named = [line for line in out.err.splitlines() if line.startswith("  skipped ")]
    first = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"][:5]  # the manifest's order
    assert named == [f"  skipped {item['item']}: missing" for item in first]
    assert f"… and 2 more, listed in {tmp_path / 'out' / 'manifest.json'}" in out.err


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """`dual-encoder ARGS` in a fresh interpreter, with TensorFlow's log level left unset as a user's shell has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "dual_encoder.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


@pytest.mark.slow
def test_tensorflow_start_up_logging_is_silent_unless_verbose(tmp_path):
    missing = str(tmp_path / "no-index")
    quiet = _run_cli("search", "--index", missing, "a red circle")  # imports TensorFlow, then fails: one line
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [f"error: no index at {missing}: directory does not exist"]

    verbose = _run_cli("--verbose", "search", "--index", missing, "a red circle")
    assert verbose.returncode == 2 and verbose.stderr.splitlines()[-1] == quiet.stderr.splitlines()[0]
    # Whatever TensorFlow itself says at start-up on this machine (oneDNN, CUDA drivers, cuInit …) shows again.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    bare = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True, timeout=300,
                          env=env)
    said = [line.split("] ", 1)[1] for line in bare.stderr.splitlines() if "] " in line]
    assert all(message in verbose.stderr for message in said), (said, verbose.stderr)
