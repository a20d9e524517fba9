"""Source readers: COCO JSON over real JPEGs, CSV/TSV, JSONL, image folders with sidecar captions, bad files."""

import json

import numpy as np
import pytest

from dual_encoder.data.sources import DataError, Reason, Record, clean_caption, read_source
from dual_encoder.errors import DualEncoderError

from .fixtures import pattern, write_coco, write_csv, write_image


def _by_id(result):
    return {record.image_id: record for record in result.records}


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  A dog   on\ta beach. ", "A dog on a beach"),
        ("Two cats..", "Two cats."),  # one trailing period only, as the Keras recipe
        ("no period", "no period"),
        (" . ", ""),
        ("\n", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_coco_reader_keeps_every_caption_per_image(tmp_path):
    for name, seed in (("train/a.jpg", 0), ("train/b.jpg", 1), ("train/c.jpg", 2)):
        write_image(tmp_path / name, pattern(seed=seed), "JPEG")
    annotations = write_coco(
        tmp_path / "captions.json",
        {391895: "train/a.jpg", 522418: "train/b.jpg", 7: "train/c.jpg"},
        [
            (391895, "A man riding a bike."),
            (522418, "A woman cutting cake"),
            (391895, "A person on a bicycle  near a river"),
            (391895, "A man riding a bike"),  # the same caption once cleaned: collapses
            (999, "an annotation for an image that is not listed"),
        ],
    )
    result = read_source("coco", annotations, tmp_path)

    records = _by_id(result)
    assert set(records) == {"391895", "522418"}  # COCO ids are the stable ids
    assert records["391895"] == Record(
        "391895", tmp_path / "train/a.jpg", ("A man riding a bike", "A person on a bicycle near a river")
    )
    assert records["522418"].captions == ("A woman cutting cake",)
    reasons = {(s.item, s.reason) for s in result.skipped}
    assert ("7", Reason.NO_CAPTION) in reasons
    assert ("annotations[4]", Reason.UNKNOWN_IMAGE) in reasons


def test_csv_reader_merges_rows_handles_quotes_bom_and_duplicates(tmp_path):
    text = (
        "\ufeffimage,caption\n"
        'dogs/1.jpg,"a dog, a ball, and a beach"\n'
        "dogs/1.jpg,a dog running\n"
        "dogs/1.jpg,a dog running\n"  # duplicate row
        './dogs/1.jpg,"a dog running."\n'  # the same image and caption once normalised
        "cats/2.jpg,a cat\n"
        "cats/3.jpg,\n"  # no caption
        ",a caption without an image\n"
    )
    (tmp_path / "pairs.csv").write_text(text, encoding="utf-8")
    result = read_source("csv", tmp_path / "pairs.csv", tmp_path)

    records = _by_id(result)
    assert list(records) == ["dogs/1.jpg", "cats/2.jpg"]
    assert records["dogs/1.jpg"].captions == ("a dog, a ball, and a beach", "a dog running")
    assert records["dogs/1.jpg"].path == tmp_path / "dogs/1.jpg"
    assert [(s.item, s.reason) for s in result.skipped] == [
        ("pairs.csv:8", Reason.BAD_ROW),
        ("cats/3.jpg", Reason.NO_CAPTION),
    ]


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.txt"])  # by extension, and sniffed from the header
def test_tsv_reader(tmp_path, name):
    (tmp_path / name).write_text("image\tcaption\na.jpg\tred, green and blue\nb.jpg\tone\n", encoding="utf-8")
    records = _by_id(read_source("csv", tmp_path / name, tmp_path))
    assert records["a.jpg"].captions == ("red, green and blue",)
    assert records["b.jpg"].captions == ("one",)


def test_jsonl_reader_accepts_both_key_spellings(tmp_path):
    lines = [
        {"file_name": "a.png", "text": "first"},
        {"image": "a.png", "caption": "second"},
        {"image": "b.png"},  # no caption
        {"caption": "no image"},  # a bad row
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    result = read_source("jsonl", path, tmp_path)
    assert _by_id(result)["a.png"].captions == ("first", "second")
    skipped = [(s.item, s.reason) for s in result.skipped]
    assert skipped == [("pairs.jsonl:4", Reason.BAD_ROW), ("b.png", Reason.NO_CAPTION)]


def test_folder_reader_is_recursive_with_sidecar_captions(tmp_path):
    write_image(tmp_path / "beach" / "photo.jpg", pattern(), "JPEG")
    (tmp_path / "beach" / "photo.txt").write_text("a beach\n\n  a sandy   beach \n", encoding="utf-8")
    write_image(tmp_path / "top.PNG", pattern(seed=1), "PNG")
    (tmp_path / "top.txt").write_text("a pattern", encoding="utf-8")
    write_image(tmp_path / "uncaptioned.png", pattern(seed=2), "PNG")
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")

    result = read_source("folder", None, tmp_path)
    records = _by_id(result)
    assert set(records) == {"beach/photo.jpg", "top.PNG"}
    assert records["beach/photo.jpg"].captions == ("a beach", "a sandy beach")
    assert [(s.item, s.reason) for s in result.skipped] == [("uncaptioned.png", Reason.NO_CAPTION)]


def test_caption_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    write_image(tmp_path / "photo.jpg", pattern(), "JPEG")
    (tmp_path / "photo.txt").write_bytes("first line\nsecond caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"photo\.txt: line 2 is not valid UTF-8"):
        read_source("folder", None, tmp_path)


def test_annotation_csv_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "pairs.csv").write_bytes(b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n")
    with pytest.raises(DataError, match="line 3"):
        read_source("csv", tmp_path / "pairs.csv", tmp_path)


@pytest.mark.parametrize(
    "kind, name, content, message",
    [
        ("coco", "captions.json", '{"images": [', "not valid JSON"),
        ("coco", "captions.json", '{"images": []}', "not a COCO captions file"),
        ("csv", "pairs.csv", "path;text\na.jpg;x\n", "header must name"),
        ("csv", "pairs.csv", 'image,caption\na.jpg,"unterminated\n', "not valid CSV"),
        ("csv", "pairs.csv", "", "empty file"),
        ("jsonl", "pairs.jsonl", '{"image": "a.jpg", "caption": "x"}\n{oops\n', "line 2 is not valid JSON"),
    ],
)
def test_invalid_annotation_file_is_a_data_error(tmp_path, kind, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_source(kind, tmp_path / name, tmp_path)


def test_zero_valid_pairs_is_a_data_error(tmp_path):
    write_csv(tmp_path / "pairs.csv", [("a.jpg", " "), ("b.jpg", ".")])
    with pytest.raises(DataError, match="no valid image–caption pairs"):
        read_source("csv", tmp_path / "pairs.csv", tmp_path)


@pytest.mark.parametrize(
    "kind, input, images_dir, message",
    [
        ("parquet", None, ".", "unknown source kind 'parquet'"),
        ("csv", None, ".", "needs an annotation file"),
        ("csv", "missing.csv", ".", "annotation file not found"),
        ("folder", None, "missing", "images folder not found"),
    ],
)
def test_bad_arguments_are_data_errors(tmp_path, kind, input, images_dir, message):
    with pytest.raises(DataError, match=message) as error:
        read_source(kind, tmp_path / input if input else None, tmp_path / images_dir)
    assert isinstance(error.value, DualEncoderError)  # the CLI prints it as one line and exits 2
    assert "\n" not in str(error.value)


def test_records_are_in_source_order_and_deterministic(tmp_path):
    rows = [(f"{i}.jpg", f"caption {i}") for i in np.random.default_rng(0).permutation(20)]
    write_csv(tmp_path / "pairs.csv", rows)
    first = read_source("csv", tmp_path / "pairs.csv", tmp_path)
    assert [r.image_id for r in first.records] == [name for name, _ in rows]
    assert read_source("csv", tmp_path / "pairs.csv", tmp_path) == first
