"""The command line for photo collections: search by image and "more like this", index sync, index dedup."""

import json

import pytest
from PIL import Image

from dual_encoder.cli import main
from dual_encoder.search import Searcher
from tests.unit.index.helpers import save_tiny_model, write_image, write_images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model", seed=0)


@pytest.fixture
def photos(tmp_path, model_dir, capsys):
    folder = tmp_path / "photos"
    write_images(folder, 6)
    assert main(["index", "build", "--model", str(model_dir), "--images", str(folder), "--output",
                 str(tmp_path / "ix"), "--quiet"]) == 0
    capsys.readouterr()
    return folder


def _search_json(capsys, *args):
    assert main(["search", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_search_by_image_by_item_and_by_a_weighted_mix(tmp_path, photos, capsys):
    index = str(tmp_path / "ix")
    [by_image] = _search_json(capsys, "--index", index, "--image", str(photos / "002.png"), "-k", "3")
    assert by_image["image"] == str(photos / "002.png") and by_image["query"] is None
    assert by_image["hits"][0]["path"] == str(photos / "002.png") and by_image["hits"][0]["score"] > 0.9999

    item = by_image["hits"][1]["id"]
    [like] = _search_json(capsys, "--index", index, "--like", str(item), "-k", "3")
    assert like["like"] == item and like["hits"][0]["id"] == item

    [mix] = _search_json(capsys, "--index", index, "--image", str(photos / "002.png"), "at night",
                         "--image-weight", "2", "--text-weight", "0.5", "-k", "6")
    searcher = Searcher.load(tmp_path / "ix")
    expected = searcher.search("at night", image=photos / "002.png", image_weight=2, text_weight=0.5, k=6)
    assert mix["weights"] == {"text": 0.5, "image": 2.0}
    assert [h["id"] for h in mix["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in mix["hits"]] == pytest.approx([h.score for h in expected], abs=1e-5)

    assert main(["search", "--index", index, "--like", str(item), "-k", "2", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert f"like #{item}" in out and (tmp_path / "g.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give a query, --image FILE or --like ID"),
        (["--like", "0", "one", "two"], "at most one text query"),
        (["--like", "999"], "no item with id 999"),
        (["--image", "/nonexistent/x.jpg"], "query image /nonexistent/x.jpg: missing"),
    ],
)
def test_bad_image_and_item_queries_are_one_line(tmp_path, photos, capsys, args, message):
    assert main(["search", "--index", str(tmp_path / "ix"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_a_query_image_that_is_not_an_image_is_one_line(tmp_path, photos, capsys):
    (tmp_path / "notes.jpg").write_text("not an image")
    assert main(["search", "--index", str(tmp_path / "ix"), "--image", str(tmp_path / "notes.jpg")]) == 2
    assert "notes.jpg: not an image" in capsys.readouterr().err


def test_sync_names_what_changed_then_counts(tmp_path, photos, capsys):
    write_images(photos, 7, first_seed=40)  # 7 new: 5 named, 2 counted
    write_image(photos / "001.png", seed=77)  # changed
    (photos / "003.png").unlink()  # gone
    assert main(["index", "sync", "--index", str(tmp_path / "ix"), "--images", str(photos), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"synced {photos}: 7 added, 1 changed, 1 removed, 4 unchanged"
    assert lines[1:6] == [f"  + {photos / f'{seed:03d}.png'}" for seed in range(40, 45)]
    assert lines[6] == "  + … and 2 more added"
    assert lines[7:9] == [f"  ~ {photos / '001.png'}", f"  - {photos / '003.png'}"]
    assert lines[9].startswith("12 items in ")

    assert main(["index", "sync", "--index", str(tmp_path / "ix"), "--images", str(photos), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"synced {photos}: 0 added, 0 changed, 0 removed, 12 unchanged",
                         "  nothing changed: the index was not rewritten"]


def test_dedup_finds_copies_of_one_photo_and_writes_a_grid(tmp_path, photos, capsys):
    # A byte copy and a lossless re-encode of 000.png embed exactly alike: one group of three at any threshold.
    (photos / "copy.png").write_bytes((photos / "000.png").read_bytes())
    with Image.open(photos / "000.png") as image:
        image.save(photos / "re-encoded.bmp")
    assert main(["index", "add", "--index", str(tmp_path / "ix"), "--images", str(photos), "--quiet"]) == 0
    capsys.readouterr()

    assert main(["index", "dedup", "--index", str(tmp_path / "ix"), "--threshold", "0.99999", "--json",
                 "--grid", str(tmp_path / "dups.png")]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["method"] == "exact" and report["threshold"] == 0.99999 and report["count"] == 8
    assert report["candidates"] == report["pairs"] == 3 and report["pixel_threshold"] == 0.97
    assert report["sizes"] == {"3": 1} and report["duplicates"] == 2
    paths = sorted(item["path"] for item in report["groups"][0]["items"])
    assert paths == sorted(str(photos / name) for name in ("000.png", "copy.png", "re-encoded.bmp"))
    assert "grid:" in out.err and (tmp_path / "dups.png").is_file()

    assert main(["index", "dedup", "--index", str(tmp_path / "ix"), "--threshold", "0.99999"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1 groups of near-duplicates among 8 items (3 candidates with cosine >= 0.99999, "
                               "3 confirmed by pixels (>= 0.97), exact")
    assert lines[0].endswith("sizes: 1 of 3") and lines[1] == "group 1: 3 images"

    # Without the pixel check every candidate counts.
    assert main(["index", "dedup", "--index", str(tmp_path / "ix"), "--threshold", "0.99999", "--embeddings-only"]) == 0
    assert capsys.readouterr().out.startswith("1 groups of near-duplicates among 8 items (3 pairs with cosine >= 0.99999, exact")

    assert main(["index", "dedup", "--index", str(tmp_path / "ix"), "--threshold", "1.5"]) == 2
    assert main(["index", "dedup", "--index", str(tmp_path / "ix"), "--pixel-threshold", "0"]) == 2
    assert main(["index", "dedup", "--index", str(tmp_path / "nowhere")]) == 2
