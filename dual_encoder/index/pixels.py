"""A second look at candidate near-duplicate pairs, by their pixels: does one image, possibly with up to a fifth of
each side cut off, look like the other? Catches re-encoded, resized, rotated and cropped copies that a
caption-trained embedding cannot tell from another picture of the same scene.

Each image becomes a small upright thumbnail (EXIF orientation applied, squeezed to a square); a pair's score is the
largest correlation between one image's full thumbnail and any of the other's crops (`CROP_FRACTIONS` of each
side's length cut off, the kept part anchored at either edge or the centre), both resampled to `COMPARE_SIZE` by
area averaging. Mean and contrast are removed first, so re-encoding and brightness changes cost little. NumPy and
Pillow only."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dual_encoder import files, images
from dual_encoder.config import DataConfig

# Chosen on the planted-copies benchmark (BENCHMARKS.md), between the lowest true pair (0.984, a 6% crop) and the
# most alike two different images (0.950).
DEFAULT_PIXEL_THRESHOLD = 0.97
THUMBNAIL_SIZE = 48  # the thumbnail kept while scoring: 6.9 KB per image
COMPARE_SIZE = 24  # what is compared: 24 x 24 x 3 numbers
# Crops that cut 2.5-20% of each side's length, in steps of 2.5% (a crop between two steps still scores high).
CROP_FRACTIONS = tuple(step / 40 for step in range(1, 9))
CROP_ANCHORS = (0.0, 0.5, 1.0)  # left/top edge, centre, right/bottom edge


@dataclasses.dataclass(frozen=True)
class PixelCheck:
    """The pixel scores of candidate pairs.

    Args:
        scores: one per pair (NaN where an image could not be read).
        unreadable: paths that could not be read (their pairs are not confirmed).
    """

    scores: np.ndarray
    unreadable: list[str]


def read_thumbnail(path: str, max_pixels: int = DataConfig.max_image_pixels) -> np.ndarray:
    """An image file as a `THUMBNAIL_SIZE` square uint8 RGB array, upright as people see it."""
    data, _ = files.read_image(path, max_pixels)  # a regular file of bounded size, its header's pixels checked
    image = images.decode(data, max_pixels, draft=(THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))
    return np.asarray(image.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _crop_operators(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column resampling matrices `[crops, target, source]`: crop k of an image `x` is `R[k] @ x @ C[k].T`.
    Crop 0 is the whole image."""
    boxes = [(0.0, 0.0, 0.0)]  # (x anchor, y anchor, fraction of the side removed)
    boxes += [(ax, ay, f) for f in CROP_FRACTIONS for ay in CROP_ANCHORS for ax in CROP_ANCHORS]
    rows = np.stack([_area_matrix(source, target, ay * f, 1 - f) for ax, ay, f in boxes])
    columns = np.stack([_area_matrix(source, target, ax * f, 1 - f) for ax, ay, f in boxes])
    return rows, columns


def _area_matrix(source: int, target: int, start: float, length: float) -> np.ndarray:
    """Area-averaging weights that resample the span `[start, start + length)` (fractions of the side) of `source`
    pixels into `target` cells."""
    edges = (start + length * np.arange(target + 1) / target) * source  # cell edges in source pixels
    low, high = edges[:-1, None], edges[1:, None]
    pixel = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(high, pixel + 1) - np.maximum(low, pixel), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def crop_signatures(thumbnail: np.ndarray, crops: Optional[int] = None) -> np.ndarray:
    """Every crop of a thumbnail (or the first `crops`; the first is the whole), resampled to `COMPARE_SIZE`,
    centred and scaled to unit length: `[crops, d]`."""
    rows, columns = _crop_operators(thumbnail.shape[0], COMPARE_SIZE)
    rows, columns = rows[:crops], columns[:crops]
    channels = thumbnail.astype(np.float32).transpose(2, 0, 1)[:, None]  # [3, 1, side, side]
    signatures = (rows @ channels @ columns.transpose(0, 2, 1)).transpose(1, 2, 3, 0).reshape(len(rows), -1)
    signatures -= signatures.mean(axis=1, keepdims=True)
    # A flat crop (one colour) has no pattern to correlate: it stays near zero and matches nothing.
    return signatures / np.maximum(np.linalg.norm(signatures, axis=1, keepdims=True), 1e-3)


def pixel_scores(
    paths: Sequence[str],
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    max_pixels: int = DataConfig.max_image_pixels,
    progress: bool = False,
) -> PixelCheck:
    """The pixel score of each pair `(paths[rows_a[i]], paths[rows_b[i]])`: the larger of (a's crops vs b whole) and
    (b's crops vs a whole); NaN where either image is unreadable. Each image is read once and kept as a thumbnail
    (6.9 KB) with its whole signature (6.9 KB) while the pairs are scored."""
    scores = np.full(len(rows_a), np.nan, np.float32)
    if len(rows_a) == 0:
        return PixelCheck(scores, [])
    involved = np.unique(np.concatenate([rows_a, rows_b]))
    thumbnails, unreadable = {}, []
    # Pillow decodes without the GIL: one reader per core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        read = pool.map(lambda row: _try_read(paths[row], max_pixels), involved)
        for row, thumbnail in zip(tqdm(involved, desc="read images", unit="img", disable=not progress), read):
            if thumbnail is None:
                unreadable.append(paths[row])
            else:
                thumbnails[int(row)] = thumbnail
    readable = np.flatnonzero([int(a) in thumbnails and int(b) in thumbnails for a, b in zip(rows_a, rows_b)])
    wholes = {row: _whole_signature(thumbnail) for row, thumbnail in thumbnails.items()}
    # Both sides of every pair, grouped by the image whose crops are compared: each image's crops are made once.
    mine = np.concatenate([rows_a[readable], rows_b[readable]])
    theirs = np.concatenate([rows_b[readable], rows_a[readable]])
    pair = np.concatenate([readable, readable])
    order = np.argsort(mine, kind="stable")
    mine, theirs, pair = mine[order], theirs[order], pair[order]
    best = np.full(len(rows_a), -1.0, np.float32)
    for part in np.split(np.arange(len(mine)), np.flatnonzero(np.diff(mine)) + 1) if len(mine) else []:
        others = np.stack([wholes[int(other)] for other in theirs[part]])
        # einsum's own loop, not BLAS: products this small waited ~25x longer for BLAS's threads on a busy machine.
        found = np.einsum("kd,md->km", crop_signatures(thumbnails[int(mine[part[0]])]), others).max(axis=0)
        np.maximum.at(best, pair[part], found)
    scores[readable] = best[readable]
    return PixelCheck(scores, unreadable)


def _try_read(path: str, max_pixels: int) -> Optional[np.ndarray]:
    try:
        return read_thumbnail(path, max_pixels)
    except OSError:  # files.FileRefusedError included: missing, not an image, corrupt, too large
        return None


def _whole_signature(thumbnail: np.ndarray) -> np.ndarray:
    return crop_signatures(thumbnail, crops=1)[0]


def confirmed(scores: np.ndarray, threshold: float = DEFAULT_PIXEL_THRESHOLD) -> np.ndarray:
    """Which pairs pass the pixel check (an unreadable pair never does)."""
    return np.nan_to_num(scores, nan=-1.0) >= threshold
