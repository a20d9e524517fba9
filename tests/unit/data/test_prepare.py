"""prepare: image validation and lossless conversion, split by image, manifest, atomic output, no-op reruns."""

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dual_encoder.data import tfrecords
from dual_encoder.data.prepare import prepare_dataset, split_records
from dual_encoder.data.sources import DataError, Reason, Record
from dual_encoder.data.tfrecords import read_examples

from .fixtures import TEST_CONFIG, decode, pattern, write_csv, write_image, write_png16


def _prepare(tmp_path, rows, config=TEST_CONFIG, output="prepared"):
    write_csv(tmp_path / "pairs.csv", rows)
    # overwrite: these tests re-prepare one output from changed inputs (refusal without it: test_safe_outputs)
    return prepare_dataset("csv", tmp_path / "pairs.csv", tmp_path, tmp_path / output, config, progress=False, overwrite=True)


def _examples(output):
    manifest = tfrecords.read_manifest(output)
    shards = [output / s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    return {example.image_id: example for example in read_examples(shards)}


def _good_images(tmp_path, count=3):
    return [
        (write_image(tmp_path / f"good{i}.jpg", pattern(seed=i), "JPEG").name, f"good picture {i}")
        for i in range(count)
    ]


# --- the bad-input corpus: each bad item is skipped and counted, the rest is written ---------------------------


def _truncated_jpeg(path):
    write_image(path, pattern(48, 48), "JPEG")
    path.write_bytes(path.read_bytes()[:300])


BAD_ITEMS = {
    "missing file": (lambda path: None, Reason.MISSING),
    "zero-byte file": (lambda path: path.write_bytes(b""), Reason.EMPTY),
    "truncated jpeg": (_truncated_jpeg, Reason.CORRUPT),
    "text file named .jpg": (lambda path: path.write_text("definitely not a JPEG\n"), Reason.NOT_IMAGE),
    "over the pixel limit": (lambda path: write_image(path, pattern(200, 60), "JPEG"), Reason.TOO_LARGE),
}


@pytest.mark.parametrize("make, reason", BAD_ITEMS.values(), ids=BAD_ITEMS.keys())
def test_bad_item_is_skipped_and_counted(tmp_path, make, reason):
    make(tmp_path / "bad.jpg")
    summary = _prepare(tmp_path, _good_images(tmp_path) + [("bad.jpg", "a bad image")])

    assert summary.images_written == 3
    assert summary.skipped == {reason: 1}
    manifest = tfrecords.read_manifest(summary.output)
    assert [(s["item"], s["reason"]) for s in manifest["skipped"]] == [(str(tmp_path / "bad.jpg"), reason)]
    assert "bad.jpg" not in _examples(summary.output)


def test_image_with_no_caption_is_skipped_and_counted(tmp_path):
    for i in range(3):
        write_image(tmp_path / "photos" / f"{i}.png", pattern(seed=i), "PNG")
        if i:
            (tmp_path / "photos" / f"{i}.txt").write_text(f"picture {i}\n", encoding="utf-8")
    summary = prepare_dataset("folder", None, tmp_path / "photos", tmp_path / "out", TEST_CONFIG, progress=False)
    assert (summary.images_written, summary.skipped) == (2, {Reason.NO_CAPTION: 1})


def test_summary_line_counts_written_and_skipped(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = _good_images(tmp_path) + [("gone.jpg", "x"), ("gone2.jpg", "y"), ("empty.jpg", "z")]
    rows += [("good0.jpg", "another caption of image 0")]
    summary = _prepare(tmp_path, rows)
    assert summary.summary_line() == "3 images written (4 captions), 3 skipped: 2 missing, 1 empty file"


def test_nothing_valid_is_a_data_error_and_writes_nothing(tmp_path):
    with pytest.raises(DataError, match=r"every image was skipped \(2 missing\)"):
        _prepare(tmp_path, [("a.jpg", "x"), ("b.jpg", "y")])
    assert not (tmp_path / "prepared").exists()
    # no temp dir left behind; only the writer lock file, which must outlive every writer
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.lock", "pairs.csv"]


# --- storage: as-is when TF decodes the bytes to the same pixels, else a lossless RGB PNG -----------------------


@pytest.mark.parametrize(
    "name, format",
    [("photo.jpg", "JPEG"), ("grey.jpg", "JPEG"), ("plain.png", "PNG"), ("anim.gif", "GIF"), ("old.bmp", "BMP")],
)
def test_decodable_images_are_stored_byte_for_byte(tmp_path, name, format):
    mode = "L" if name.startswith("grey") else "RGB"
    write_image(tmp_path / name, pattern(), format, mode=mode)
    _prepare(tmp_path, [(name, "as is")], TEST_CONFIG)
    example = _examples(tmp_path / "prepared")[name]
    assert example.image_bytes == (tmp_path / name).read_bytes()
    assert example.image_format == format.lower()
    expected = np.asarray(Image.open(tmp_path / name).convert("RGB"))
    if format != "JPEG":  # JPEG decoders may round differently; the rest must agree exactly
        np.testing.assert_array_equal(decode(example.image_bytes), expected)


def _expect_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _rgba(path):
    pixels = np.dstack([pattern(), np.tile(np.array([0, 255, 128, 255], np.uint8), 24 * 4)[: 24 * 16].reshape(16, 24)])
    Image.fromarray(pixels, "RGBA").save(path, format="PNG")
    return pixels


def _rgba_on_white(path):
    rgba = _rgba(path).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


def _png16(path):
    pixels = np.random.default_rng(0).integers(0, 65536, size=(10, 12, 3)).astype(np.uint16)
    write_png16(path, pixels)
    return pixels


CONVERTED = {
    # name: (make the file, the RGB pixels the stored PNG must decode to)
    "grey16.png": (
        lambda p: Image.fromarray((pattern()[..., 0].astype(np.uint16) * 257)).save(p, format="PNG"),
        lambda p: np.repeat(pattern()[..., :1], 3, axis=2),
    ),
    "rgb16.png": (_png16, lambda p: np.asarray(Image.open(p).convert("RGB"))),
    "rgba.png": (_rgba, _rgba_on_white),
    "palette.png": (lambda p: write_image(p, pattern(), "PNG", mode="P"), _expect_rgb),
    "greyalpha.png": (lambda p: write_image(p, pattern(), "PNG", mode="LA"), _expect_rgb),
    "cmyk.jpg": (lambda p: write_image(p, pattern(), "JPEG", mode="CMYK"), _expect_rgb),
    "photo.tiff": (lambda p: write_image(p, pattern(), "TIFF"), _expect_rgb),
    "photo.webp": (lambda p: write_image(p, pattern(), "WEBP", lossless=True), _expect_rgb),
}


@pytest.mark.parametrize("name", CONVERTED)
def test_images_needing_conversion_become_lossless_rgb_png(tmp_path, name):
    make, expected_pixels = CONVERTED[name]
    path = tmp_path / name
    make(path)
    expected = expected_pixels(path)
    _prepare(tmp_path, [(name, "converted")])

    example = _examples(tmp_path / "prepared")[name]
    assert example.image_format == "png"
    assert example.image_bytes[:8] == b"\x89PNG\r\n\x1a\n"
    stored = Image.open(io.BytesIO(example.image_bytes))
    assert (stored.mode, stored.info.get("transparency")) == ("RGB", None)  # 8-bit RGB, nothing left to convert
    np.testing.assert_array_equal(decode(example.image_bytes), expected)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    pixels = _png16(tmp_path / "deep.png")
    _prepare(tmp_path, [("deep.png", "deep")])
    stored = decode(_examples(tmp_path / "prepared")["deep.png"].image_bytes)
    assert np.abs(stored.astype(int) - (pixels >> 8)).max() <= 1
    assert stored.max() > 200  # a clipping conversion would saturate or zero most values


def test_exif_rotated_jpeg_is_stored_upright(tmp_path):
    # As stored: 24 wide x 12 high, red block at the top-left. Orientation 6 = "rotate 90° clockwise to view".
    pixels = np.full((12, 24, 3), 255, np.uint8)
    pixels[:4, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(tmp_path / "phone.jpg", pixels, "JPEG", exif=exif, quality=95)
    _prepare(tmp_path, [("phone.jpg", "a phone picture")])

    example = _examples(tmp_path / "prepared")["phone.jpg"]
    stored = decode(example.image_bytes)
    assert example.image_format == "png"
    assert stored.shape == (24, 12, 3)  # upright: now tall
    red = (stored[..., 0] > 200) & (stored[..., 1] < 60)
    rows, cols = np.nonzero(red)
    assert rows.max() < 6 and cols.min() >= 6  # the red block is now top-RIGHT, as a viewer shows it
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB"))
    np.testing.assert_array_equal(stored, upright)  # lossless copy of the decoded, rotated pixels


# --- split, records, manifest -------------------------------------------------------------------------------------


def _records(n):
    return [Record(f"img{i}", Path(f"{i}.jpg"), (f"c{i}",)) for i in range(n)]


def test_split_is_by_image_disjoint_deterministic_and_seeded():
    records = _records(40)
    split = split_records(records, 0.25, seed=0)
    train, validation = ({r.image_id for r in split[name]} for name in ("train", "validation"))
    assert len(validation) == 10 and len(train) == 30
    assert not train & validation and train | validation == {r.image_id for r in records}
    assert split_records(list(reversed(records)), 0.25, seed=0) == split  # independent of source order
    assert split_records(records, 0.25, seed=1)["validation"] != split["validation"]
    assert split_records(_records(3), 0.01, seed=0)["validation"]  # a requested split is never empty
    with pytest.raises(ValueError, match="validation_fraction"):
        split_records(records, 1.0, seed=0)


def test_tfrecord_round_trip_keeps_bytes_and_captions(tmp_path):
    rows = []
    for i in range(7):
        write_image(tmp_path / f"{i}.jpg", pattern(seed=i), "JPEG")
        rows += [(f"{i}.jpg", f"caption {i}"), (f"{i}.jpg", f"another caption, number {i}")]
    summary = _prepare(tmp_path, rows)

    examples = _examples(summary.output)
    assert set(examples) == {f"{i}.jpg" for i in range(7)}
    for i in range(7):
        example = examples[f"{i}.jpg"]
        assert example.image_bytes == (tmp_path / f"{i}.jpg").read_bytes()
        assert example.captions == (f"caption {i}", f"another caption, number {i}")
        assert example.source_path == str(tmp_path / f"{i}.jpg")
    assert (summary.images_written, summary.captions_written, summary.splits) == (7, 14, {"train": 5, "validation": 2})


def test_manifest_records_counts_splits_checksums_source_and_skips(tmp_path):
    (tmp_path / "bad.jpg").write_text("text")
    rows = _good_images(tmp_path, 5) + [("bad.jpg", "bad"), ("good1.jpg", "second caption")]
    summary = _prepare(tmp_path, rows)
    manifest = tfrecords.verify_dataset(summary.output)  # every listed file is there with its sha256

    assert manifest["counts"] == {"images": 5, "captions": 6, "skipped": 1}
    assert {n: (s["images"], len(s["shards"])) for n, s in manifest["splits"].items()} == {
        "train": (4, 2),  # shard_size 2
        "validation": (1, 1),
    }
    assert sum(s["captions"] for s in manifest["splits"].values()) == 6
    assert manifest["source"] == {"kind": "csv", "input": str(tmp_path / "pairs.csv"), "images_dir": str(tmp_path)}
    assert manifest["config"]["shard_size"] == 2
    assert manifest["skipped"] == [{"item": str(tmp_path / "bad.jpg"), "reason": Reason.NOT_IMAGE, "detail": ""}]
    assert manifest["formats"] == {"jpeg": 5}

    shard = summary.output / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(DataError, match="checksum mismatch"):
        tfrecords.verify_dataset(summary.output)


# --- atomic output and no-op reruns --------------------------------------------------------------------------------


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_failure_mid_prepare_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    rows = _good_images(tmp_path, 6)
    first = _prepare(tmp_path, rows)
    before = _snapshot(first.output)

    real_write_shards = tfrecords.write_shards

    def fail_after_first_shard(examples, directory, split, shard_size):
        def limited():
            for count, example in enumerate(examples):
                if count == shard_size:
                    raise OSError("No space left on device")
                yield example

        return real_write_shards(limited(), directory, split, shard_size)

    monkeypatch.setattr(tfrecords, "write_shards", fail_after_first_shard)
    with pytest.raises(OSError, match="No space left"):
        _prepare(tmp_path, rows + [("good0.jpg", "a new caption: the inputs changed")])

    assert _snapshot(first.output) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".prepared.lock"]  # temp dir removed


def test_rerun_with_the_same_inputs_is_a_no_op(tmp_path):
    rows = _good_images(tmp_path, 4)
    first = _prepare(tmp_path, rows)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.output.iterdir()}

    again = _prepare(tmp_path, rows)
    assert again.skipped_now and not first.skipped_now
    assert (again.images_written, again.captions_written, again.splits) == (4, 4, first.splits)
    assert {p.name: p.stat().st_mtime_ns for p in first.output.iterdir()} == stamps
    assert "up to date" in again.summary_line()

    os.utime(tmp_path / "good0.jpg", ns=(1, 1))  # an image changed on disk: prepared again
    assert not _prepare(tmp_path, rows).skipped_now
    assert not _prepare(tmp_path, rows, dataclasses.replace(TEST_CONFIG, split_seed=5)).skipped_now  # config too


def test_refuses_to_overwrite_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="not a prepared dataset: not replacing it"):
        _prepare(tmp_path, _good_images(tmp_path))
    assert (tmp_path / "prepared" / "thesis.tex").read_text() == "years of work"

