"""The pixel check of near-duplicate candidates: copies of one picture (re-encoded, resized, cropped, EXIF-rotated)
pass, different pictures of the same kind do not, unreadable files are named; and `find_duplicates` uses it."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dual_encoder.config import IndexConfig
from dual_encoder.index import ImageIndex, ImageRecord, ModelRecord, find_duplicates
from dual_encoder.index.pixels import (
    DEFAULT_PIXEL_THRESHOLD,
    THUMBNAIL_SIZE,
    _area_matrix,
    crop_signatures,
    pixel_scores,
    read_thumbnail,
)


def _picture(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth background and a few filled shapes: what a photo is to a 24-pixel thumbnail."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    start, slope = rng.uniform(60, 200, 3), rng.uniform(-60, 60, (2, 3))
    image = Image.fromarray(np.clip(start + slope[0] * x + slope[1] * y, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        left, top = rng.integers(0, size[0] - 30), rng.integers(0, size[1] - 30)
        box = (left, top, left + rng.integers(15, 40), top + rng.integers(15, 40))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _copies(folder, seed=0):
    """The original and its four kinds of copy, as the benchmark plants them."""
    image = _picture(seed)
    width, height = image.size
    paths = {name: folder / name for name in ("original.png", "jpeg.jpg", "resized.png", "cropped.png", "rotated.jpg",
                                               "cropped-left.png")}  # fmt: skip
    image.save(paths["original.png"])
    image.save(paths["jpeg.jpg"], quality=70)
    image.resize((width * 3 // 4, height * 3 // 4), Image.Resampling.LANCZOS).save(paths["resized.png"])
    mx, my = round(width * 0.06), round(height * 0.06)
    image.crop((mx, my, width - mx, height - my)).save(paths["cropped.png"])
    exif = Image.Exif()
    exif[0x0112] = 6
    image.transpose(Image.Transpose.ROTATE_90).save(paths["rotated.jpg"], quality=95, exif=exif)
    # A crop between the grid's steps, from one corner: 7% off the left and top only.
    image.crop((round(width * 0.07), round(height * 0.07), width, height)).save(paths["cropped-left.png"])
    return [str(path) for path in paths.values()]


def test_area_resampling_weights_sum_to_one_and_the_whole_crop_is_a_box_resize():
    weights = _area_matrix(48, 24, 0.1, 0.8)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert weights[:, :4].sum() == 0  # the first 10% of the side is cropped away
    thumbnail = np.asarray(_picture(3).resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX))
    ours = crop_signatures(thumbnail, crops=1)[0]
    pillow = np.asarray(Image.fromarray(thumbnail).resize((24, 24), Image.Resampling.BOX), np.float32).ravel()
    pillow = (pillow - pillow.mean()) / np.linalg.norm(pillow - pillow.mean())
    assert float(ours @ pillow) > 0.999


def test_every_kind_of_copy_passes_and_different_pictures_do_not(tmp_path):
    paths = _copies(tmp_path)
    others = []
    for seed in range(1, 9):
        others.append(str(tmp_path / f"other-{seed}.png"))
        _picture(seed).save(others[-1])
    everything = paths + others
    rows_a = np.array([0] * (len(paths) - 1) + [0] * len(others))
    rows_b = np.array(list(range(1, len(paths))) + list(range(len(paths), len(everything))))
    check = pixel_scores(everything, rows_a, rows_b)
    copies, different = check.scores[: len(paths) - 1], check.scores[len(paths) - 1 :]
    assert check.unreadable == []
    assert np.all(copies >= DEFAULT_PIXEL_THRESHOLD), dict(zip(paths[1:], copies))
    assert np.all(different < 0.9), different


def test_an_unreadable_image_fails_its_pairs_and_is_named(tmp_path):
    paths = _copies(tmp_path)[:2] + [str(tmp_path / "gone.png"), str(tmp_path / "notes.png")]
    (tmp_path / "notes.png").write_text("not an image")
    check = pixel_scores(paths, np.array([0, 0, 1]), np.array([1, 2, 3]))
    assert check.scores[0] >= DEFAULT_PIXEL_THRESHOLD and np.isnan(check.scores[1:]).all()
    assert sorted(check.unreadable) == sorted(paths[2:])


def test_read_thumbnail_is_a_small_upright_square(tmp_path):
    paths = _copies(tmp_path)
    original, rotated = read_thumbnail(paths[0]), read_thumbnail(paths[4])
    assert original.shape == (THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3) and original.dtype == np.uint8
    assert np.abs(original.astype(int) - rotated.astype(int)).mean() < 6  # as viewed, not as stored


def test_find_duplicates_keeps_the_candidates_that_look_alike(tmp_path):
    # Every embedding equal: all 10 pairs are candidates; only the copies of one picture look alike.
    paths = _copies(tmp_path)[:3]
    for seed in (5, 6):
        paths.append(str(tmp_path / f"other-{seed}.png"))
        _picture(seed).save(paths[-1])
    records = [ImageRecord(path=p, sha256=f"{i:064x}") for i, p in enumerate(paths)]
    index = ImageIndex.create(np.ones((5, 4), np.float32) / 2, records, IndexConfig(), ModelRecord("/m", "f" * 64))

    report = find_duplicates(index)
    assert report.candidates == 10 and report.pairs == 3 and [g.ids for g in report.groups] == [[0, 1, 2]]
    assert report.to_dict()["pixel_threshold"] == DEFAULT_PIXEL_THRESHOLD and report.unreadable == []
    unchecked = find_duplicates(index, pixel_threshold=None)
    assert unchecked.pairs == 10 and [g.ids for g in unchecked.groups] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("pixel_threshold", [0, 1.5, "0.9"])
def test_the_pixel_threshold_is_checked(tmp_path, pixel_threshold):
    from dual_encoder.index import QueryError

    index = ImageIndex.create(np.eye(2, dtype=np.float32), [ImageRecord(path=f"/{i}", sha256=f"{i:064x}") for i in
                              range(2)], IndexConfig(), ModelRecord("/m", "f" * 64))  # fmt: skip
    with pytest.raises(QueryError, match="pixel threshold must be"):
        find_duplicates(index, pixel_threshold=pixel_threshold)
