"""Building, adding to and removing from an index with a real (tiny, untrained) model."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from dual_encoder import files
from dual_encoder.config import DataConfig, IndexConfig
from dual_encoder.data.pipeline import decode_and_resize
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic
from dual_encoder.index import (
    DatasetSplit,
    GallerySourceError,
    ImageIndex,
    ImageIndexError,
    ModelMismatchError,
    add_to_index,
    build_index,
    remove_from_index,
    sync_index,
)
from dual_encoder.index.store import MANIFEST
from dual_encoder.models import load_model
from tests.unit.index.helpers import save_tiny_model, write_image, write_images

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model", seed=0)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 4)
    write_image(folder / "nested" / "deep.jpg", seed=10)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"ignored")
    return folder


def test_build_from_a_folder_embeds_images_and_reports_bad_files(tmp_path, model_dir, photos):
    summary = build_index(model_dir, photos, tmp_path / "ix", IndexConfig(embed_batch_size=2), **QUIET)

    assert (summary.count, summary.embedded, summary.dim, summary.kind) == (5, 5, 16, "exact")
    assert {(os.path.basename(s.path), s.reason) for s in summary.skipped} == {
        ("broken.jpg", files.Refused.CORRUPT),
        ("notes.txt", "not an image file (extension)"),
    }
    index = ImageIndex.load(tmp_path / "ix")
    paths = [item.path for item in index.items]
    assert paths == sorted(str(p) for p in photos.rglob("*.??g") if p.name[0] != "." and p.name != "broken.jpg")
    first = index.items[0]
    assert first.size == os.path.getsize(first.path) and first.mtime == pytest.approx(os.path.getmtime(first.path))
    # The stored embedding is the image tower's output for the decoded file.
    model = load_model(model_dir)
    pixels = decode_and_resize(open(first.path, "rb").read(), 32)[None]
    np.testing.assert_allclose(index.embeddings[0], model.encode_image(pixels).numpy()[0], atol=1e-5)
    manifest = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert manifest["model"]["dir"] == str(model_dir.absolute())


def test_build_from_a_list_file_resolves_relative_paths(tmp_path, model_dir, photos):
    listing = photos / "list.txt"
    listing.write_text("# gallery\n000.png\n\nnested/deep.jpg\nmissing.png\n")
    summary = build_index(model_dir, listing, tmp_path / "ix", **QUIET)
    assert summary.count == 2
    assert [(os.path.basename(s.path), s.reason) for s in summary.skipped] == [("missing.png", "file not found")]


def test_build_from_a_prepared_split_keeps_captions(tmp_path, model_dir):
    csv_path = generate_synthetic(tmp_path / "raw", num_images=8, image_size=32)
    prepared = tmp_path / "prepared"
    prepare_dataset("csv", csv_path, csv_path.parent / "images", prepared, DataConfig(shard_size=3), progress=False)
    summary = build_index(model_dir, DatasetSplit(prepared, "train"), tmp_path / "ix", **QUIET)
    index = ImageIndex.load(tmp_path / "ix")
    assert summary.count == len(index) > 0 and not summary.skipped
    assert all(item.caption and item.path.endswith(".png") for item in index.items)
    # Same images, same embeddings, whether read from the split or from their files.
    folder = tmp_path / "same"
    for item in index.items:
        (folder / os.path.basename(item.path)).parent.mkdir(exist_ok=True)
        (folder / os.path.basename(item.path)).write_bytes(open(item.path, "rb").read())
    from_files = build_index(model_dir, folder, tmp_path / "files.ix", **QUIET)
    assert from_files.count == len(index)
    by_hash = {item.sha256: row for row, item in enumerate(ImageIndex.load(tmp_path / "files.ix").items)}
    file_embeddings = ImageIndex.load(tmp_path / "files.ix").embeddings
    for row, item in enumerate(index.items):
        np.testing.assert_allclose(index.embeddings[row], file_embeddings[by_hash[item.sha256]], atol=1e-6)


def test_nothing_to_index_is_a_clear_error(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(GallerySourceError, match=r"no images could be indexed .* \(1 files skipped\)"):
        build_index(model_dir, tmp_path / "empty", tmp_path / "ix", **QUIET)
    with pytest.raises(GallerySourceError, match="does not exist"):
        build_index(model_dir, tmp_path / "nowhere", tmp_path / "ix", **QUIET)
    assert not (tmp_path / "ix").exists()


def test_building_over_a_folder_that_is_not_an_index_is_refused(tmp_path, model_dir, photos):
    before = sorted(p.name for p in photos.rglob("*"))
    with pytest.raises(ImageIndexError, match="not an index: not replacing it"):
        build_index(model_dir, photos, photos, **QUIET)
    assert sorted(p.name for p in photos.rglob("*")) == before


def test_add_embeds_only_new_content(tmp_path, model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    before = ImageIndex.load(tmp_path / "ix")
    ids_before = {item.path: item.id for item in before.items}

    write_images(photos, 2, first_seed=20)  # two new images
    (photos / "copy.png").write_bytes((photos / "000.png").read_bytes())  # known content, new path
    write_image(photos / "001.png", seed=30)  # changed content at a known path
    summary = add_to_index(tmp_path / "ix", photos, **QUIET)

    assert (summary.embedded, summary.reused, summary.replaced, summary.unchanged) == (3, 1, 1, 4)
    after = ImageIndex.load(tmp_path / "ix")
    assert len(after) == 8
    by_path = {item.path: item for item in after.items}
    assert by_path[str(photos / "000.png")].id == ids_before[str(photos / "000.png")]
    assert by_path[str(photos / "001.png")].id not in ids_before.values()  # re-embedded: new id
    copy_row, original_row = (after.items.row_of(by_path[str(photos / n)].id) for n in ("copy.png", "000.png"))
    np.testing.assert_array_equal(after.embeddings[copy_row], after.embeddings[original_row])


def test_adding_unchanged_files_is_a_no_op(tmp_path, model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    (photos / "broken.jpg").unlink()  # nothing left to try to embed
    manifest = (tmp_path / "ix" / MANIFEST).read_bytes()
    summary = add_to_index(tmp_path / "ix", photos, **QUIET)
    assert (summary.embedded, summary.unchanged, summary.written) == (0, 5, False)
    assert (tmp_path / "ix" / MANIFEST).read_bytes() == manifest


def test_add_refuses_a_model_with_another_fingerprint(tmp_path, model_dir, other_model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    write_image(photos / "new.png", seed=40)
    with pytest.raises(ModelMismatchError, match="fingerprint mismatch"):
        add_to_index(tmp_path / "ix", photos, model_dir=other_model_dir, **QUIET)
    assert len(ImageIndex.load(tmp_path / "ix")) == 5


def test_remove_by_path_by_folder_and_missing(tmp_path, model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    summary = remove_from_index(tmp_path / "ix", paths=[photos / "000.png", photos / "nope.png"])
    assert summary.removed == 1 and [os.path.basename(s.path) for s in summary.skipped] == ["nope.png"]
    assert remove_from_index(tmp_path / "ix", paths=[photos / "nested"]).removed == 1
    (photos / "002.png").unlink()
    summary = remove_from_index(tmp_path / "ix", missing=True)
    assert summary.removed == 1
    remaining = [os.path.basename(item.path) for item in ImageIndex.load(tmp_path / "ix").items]
    assert remaining == ["001.png", "003.png"]
    assert remove_from_index(tmp_path / "ix", missing=True).written is False


# -- sync: one atomic update that mirrors a folder ------------------------------------------------------------------


def test_sync_adds_new_re_embeds_changed_and_removes_missing_files_in_one_write(tmp_path, model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    other = write_image(tmp_path / "elsewhere" / "kept.png", seed=50)  # indexed, but outside the synced folder
    add_to_index(tmp_path / "ix", tmp_path / "elsewhere", **QUIET)
    before = ImageIndex.load(tmp_path / "ix")
    ids_before = {item.path: item.id for item in before.items}

    write_image(photos / "new.png", seed=21)
    write_image(photos / "001.png", seed=31)  # same path, new content
    (photos / "002.png").unlink()
    (photos / "nested" / "deep.jpg").unlink()
    (photos / "003.png").write_bytes(b"\x89PNG now truncated")  # indexed, now unreadable: its stale item goes
    saves = []
    original_save = ImageIndex.save
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageIndex, "save", lambda self, *a, **kw: saves.append(1) or original_save(self, *a, **kw))
        summary = sync_index(tmp_path / "ix", photos, **QUIET)

    assert saves == [1]  # one atomic update
    assert summary.added_paths == [str(photos / "new.png")]
    assert summary.replaced_paths == [str(photos / "001.png")]
    assert summary.removed_paths == [str(photos / "002.png"), str(photos / "003.png"), str(photos / "nested" / "deep.jpg")]
    assert (summary.embedded, summary.replaced, summary.removed, summary.unchanged) == (2, 1, 3, 1)
    assert ("003.png", files.Refused.NOT_IMAGE) in {(os.path.basename(s.path), s.reason) for s in summary.skipped}
    after = ImageIndex.load(tmp_path / "ix")
    by_path = {item.path: item.id for item in after.items}
    assert sorted(by_path) == sorted([str(photos / "000.png"), str(photos / "001.png"), str(photos / "new.png"), str(other)])
    assert by_path[str(photos / "000.png")] == ids_before[str(photos / "000.png")]
    assert by_path[str(photos / "001.png")] not in ids_before.values()
    assert by_path[str(other)] == ids_before[str(other)]  # outside the folder: left alone


def test_sync_of_an_unchanged_folder_writes_nothing(tmp_path, model_dir, photos):
    (photos / "broken.jpg").unlink()
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    manifest = (tmp_path / "ix" / MANIFEST).read_bytes()
    summary = sync_index(tmp_path / "ix", photos, **QUIET)
    assert (summary.written, summary.unchanged, summary.added_paths, summary.removed_paths) == (False, 5, [], [])
    assert (tmp_path / "ix" / MANIFEST).read_bytes() == manifest


def test_sync_needs_a_folder_and_an_index(tmp_path, model_dir, photos):
    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    with pytest.raises(GallerySourceError, match="is not a folder"):
        sync_index(tmp_path / "ix", photos / "000.png", **QUIET)
    with pytest.raises(ImageIndexError, match="no index at"):
        sync_index(tmp_path / "nothing", photos, **QUIET)


def test_sync_holds_the_writer_lock_so_a_concurrent_add_is_not_lost(tmp_path, model_dir, photos):
    from dual_encoder.atomic import writer_lock

    build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    write_image(photos / "new.png", seed=22)
    with writer_lock(tmp_path / "ix"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DUAL_ENCODER_LOCK_TIMEOUT", "0")
            with pytest.raises(Exception, match="being written by another process"):
                sync_index(tmp_path / "ix", photos, **QUIET)
    assert len(ImageIndex.load(tmp_path / "ix")) == 5


# -- photos as people see them: EXIF orientation, WebP / TIFF / HEIC, the pixel limit ------------------------------


def _stored_pixels(seed: int) -> np.ndarray:
    """48 wide x 24 high random 4x4 blocks: non-square, so a rotation changes what the tower sees."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 12, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)


def _phone_photo(folder, name: str, orientation: int, seed: int):
    """A JPEG stored landscape with an EXIF orientation tag, its upright pixels and its pixels as stored (PNGs)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_stored_pixels(seed)).save(folder / f"{name}.jpg", exif=exif, quality=95)
    with Image.open(folder / f"{name}.jpg") as photo:
        ImageOps.exif_transpose(photo).convert("RGB").save(folder / f"{name}-upright.png")
        photo.convert("RGB").save(folder / f"{name}-as-stored.png")  # what `tf.io.decode_image` alone would see


def test_photos_are_indexed_as_people_see_them_in_every_format_pillow_reads(tmp_path, model_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    _phone_photo(photos, "portrait", orientation=6, seed=1)
    pixels = _stored_pixels(2)
    Image.fromarray(pixels).save(photos / "pattern.png")
    Image.fromarray(pixels).save(photos / "pattern.webp", lossless=True)
    Image.fromarray(pixels).save(photos / "pattern.tiff")
    if files.HEIF_SUPPORTED:  # the `heic` extra (installed by `make install`)
        Image.fromarray(pixels).save(photos / "pattern.heic", quality=-1)  # lossless
    Image.fromarray(np.zeros((100, 60, 3), np.uint8)).save(photos / "big.png")  # 6,000 pixels

    summary = build_index(model_dir, photos, tmp_path / "ix", max_image_pixels=5_000, **QUIET)

    index = ImageIndex.load(tmp_path / "ix")
    row = {os.path.basename(item.path): position for position, item in enumerate(index.items)}
    embedding = {name: index.embeddings[position] for name, position in row.items()}
    assert "big.png" not in row
    assert [(os.path.basename(s.path), s.reason) for s in summary.skipped] == [("big.png", files.Refused.TOO_LARGE)]
    assert summary.skipped_counts == {files.Refused.TOO_LARGE: 1}
    assert "60x100 pixels > 5000" in summary.skipped[0].detail

    # The phone's portrait photo is embedded upright, not lying on its side as its pixels are stored.
    np.testing.assert_allclose(embedding["portrait.jpg"], embedding["portrait-upright.png"], atol=1e-4)
    assert np.abs(embedding["portrait.jpg"] - embedding["portrait-as-stored.png"]).max() > 1e-4
    # WebP and TIFF (and HEIC) are indexed, as the pixels they hold.
    others = ["pattern.webp", "pattern.tiff"] + (["pattern.heic"] if files.HEIF_SUPPORTED else [])
    for name in others:
        np.testing.assert_allclose(embedding[name], embedding["pattern.png"], atol=1e-4 if "heic" not in name else 1e-2)  # HEIC: YUV, ±1 level

    # `add` reads files the same way.
    _phone_photo(photos, "turned", orientation=8, seed=3)
    for name in ("turned-upright.png", "turned-as-stored.png"):
        os.replace(photos / name, tmp_path / name)
    added = add_to_index(tmp_path / "ix", photos, max_image_pixels=5_000, **QUIET)
    assert added.embedded == 1 and added.skipped_counts == {files.Refused.TOO_LARGE: 1}
    os.replace(tmp_path / "turned-upright.png", photos / "turned-upright.png")
    os.replace(tmp_path / "turned-as-stored.png", photos / "turned-as-stored.png")
    assert add_to_index(tmp_path / "ix", photos, max_image_pixels=5_000, **QUIET).embedded == 2
    index = ImageIndex.load(tmp_path / "ix")
    embedding = {os.path.basename(item.path): index.embeddings[row] for row, item in enumerate(index.items)}
    np.testing.assert_allclose(embedding["turned.jpg"], embedding["turned-upright.png"], atol=1e-4)
    assert np.abs(embedding["turned.jpg"] - embedding["turned-as-stored.png"]).max() > 1e-4


def test_a_file_pillow_cannot_finish_decoding_is_skipped_and_counted_as_corrupt(tmp_path, model_dir):
    photos = tmp_path / "photos"
    write_images(photos, 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_stored_pixels(4)).save(photos / "cut.jpg", exif=exif)
    (photos / "cut.jpg").write_bytes((photos / "cut.jpg").read_bytes()[:400])  # header fine, data cut short
    summary = build_index(model_dir, photos, tmp_path / "ix", **QUIET)
    assert summary.count == 2
    assert summary.skipped_counts == {files.Refused.CORRUPT: 1}
    assert os.path.basename(summary.skipped[0].path) == "cut.jpg"
