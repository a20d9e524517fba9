"""Near-duplicate images in an index: candidate pairs whose embeddings' cosine reaches a threshold, confirmed by
their pixels (`pixels`), grouped into connected components (re-encoded, resized, cropped or rotated copies of one
photo end up in one group).

Two signals because neither suffices alone (BENCHMARKS.md): an embedding trained on captions sees meaning, so two
different pictures of one scene can score higher than a photo and its 6% crop; pixels tell them apart, but comparing
every pair's pixels is out of reach. Up to `EXACT_LIMIT` items the candidates come from an exact, chunked self-join
(blocks of matrix products over the upper triangle, never an N x N matrix); beyond it from a FAISS IVF range search,
which is approximate (a pair whose two vectors fall in lists that are not probed is missed). The pixel check reads
each image in a candidate pair once. NumPy, SciPy, Pillow and FAISS only: no TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dual_encoder.config import DataConfig, IndexConfig
from dual_encoder.index import pixels
from dual_encoder.index.ann import AnnIndex, IndexKind
from dual_encoder.index.errors import ImageIndexError, QueryError
from dual_encoder.index.store import ImageIndex

# The embedding cosine that makes a pair a candidate: low, because the pixel check decides. Measured on planted
# copies (BENCHMARKS.md): 0.8 keeps 99.8% of true pairs as candidates with the demo model, 99.1% with a random one;
# 0.95 kept 83% (it lost most 6% crops). Without the pixel check, use a higher threshold (0.95).
DEFAULT_THRESHOLD = 0.8
DEFAULT_PIXEL_THRESHOLD = pixels.DEFAULT_PIXEL_THRESHOLD
# The exact self-join costs N^2 * D / 2 multiply-adds: ~45 min for 1M x 256 on 2 idle cores, ~1.5 h on busy ones
# (BENCHMARKS.md); above this the FAISS range search takes over.
EXACT_LIMIT = 1_000_000
# 4096 x 4096 float32 scores = 64 MiB per block: large enough for BLAS to run at full speed.
DEFAULT_BLOCK_ROWS = 4096
# Pairs kept in memory (16 bytes each). A threshold that passes more pairs than this merges most of a large gallery
# into one group, which is not a useful answer: raise the threshold.
MAX_PAIRS = 20_000_000
_RANGE_QUERY_BLOCK = 8192


class DedupMethod(str, enum.Enum):
    AUTO = "auto"  # exact up to EXACT_LIMIT items, then faiss
    EXACT = "exact"
    FAISS = "faiss"


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Items that are near-duplicates of each other (a connected component of the pairs above the threshold).

    Args:
        ids: item ids, increasing.
        paths: their image files.
        scores: each member's cosine with the first member (1.0 for the first itself).
    """

    ids: list[int]
    paths: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": len(self),
            "items": [{"id": i, "path": p, "score": s} for i, p, s in zip(self.ids, self.paths, self.scores)],
        }


@dataclasses.dataclass(frozen=True)
class DedupReport:
    """What `find_duplicates` found.

    Args:
        threshold: the embedding cosine a pair reached to be a candidate.
        pixel_threshold: the pixel score a candidate reached to count (None: no pixel check, candidates count).
        count: items searched.
        method: `exact` or `faiss`.
        candidates: pairs at or above `threshold`.
        pairs: the candidates that passed the pixel check (all of them without one).
        groups: groups of two or more, largest first (ties: lowest first id).
        seconds: wall time of the pair search, the pixel check and grouping.
        unreadable: image files the pixel check could not read (their pairs do not count).
    """

    threshold: float
    pixel_threshold: Optional[float]
    count: int
    method: str
    candidates: int
    pairs: int
    groups: list[DuplicateGroup]
    seconds: float
    unreadable: list[str] = dataclasses.field(default_factory=list)

    @property
    def sizes(self) -> dict[int, int]:
        """Number of groups of each size, smallest size first."""
        return dict(sorted(collections.Counter(len(group) for group in self.groups).items()))

    @property
    def duplicates(self) -> int:
        """Items that could go while keeping one of each group."""
        return sum(len(group) - 1 for group in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "count": self.count,
            "method": self.method,
            "candidates": self.candidates,
            "pairs": self.pairs,
            "groups_total": len(self.groups),
            "items_in_groups": sum(len(group) for group in self.groups),
            "duplicates": self.duplicates,
            "sizes": {str(size): number for size, number in self.sizes.items()},
            "seconds": round(self.seconds, 3),
            "unreadable": self.unreadable,
            "groups": [group.to_dict() for group in self.groups],
        }


def find_duplicates(
    index: Union[ImageIndex, str, Path],
    threshold: float = DEFAULT_THRESHOLD,
    method: Union[DedupMethod, str] = DedupMethod.AUTO,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    max_pairs: int = MAX_PAIRS,
    config: Optional[IndexConfig] = None,
    pixel_threshold: Optional[float] = DEFAULT_PIXEL_THRESHOLD,
    max_image_pixels: int = DataConfig.max_image_pixels,
    progress: bool = False,
) -> DedupReport:
    """Groups of near-duplicate images in an index.

    Args:
        index: an `ImageIndex` or its directory (read only: no lock is taken).
        threshold: pairs whose embeddings' cosine is at least this are candidates (in (0, 1]).
        method: `exact` (chunked self-join), `faiss` (IVF range search, approximate) or `auto`.
        block_rows: rows per block of the exact self-join.
        max_pairs: refuse (`QueryError`) a threshold that passes more pairs than this.
        config: the FAISS parameters (`ivf_nlist`, `ivf_nprobe`) of the `faiss` method; default the index's own.
        pixel_threshold: a candidate counts when its pixel score (`pixels.pixel_scores`: one image, possibly
            cropped, correlated with the other) reaches this; None counts every candidate (then raise `threshold`).
        max_image_pixels: the pixel check refuses larger images (decompression bombs).
        progress: a progress bar while the pixel check reads images.

    Example:
        >>> report = find_duplicates("photos.index")
        >>> report.sizes, [group.paths for group in report.groups[:3]]
    """
    started = time.perf_counter()
    if not isinstance(index, ImageIndex):
        index = ImageIndex.load(index)
    threshold = check_threshold(threshold)
    if pixel_threshold is not None:
        pixel_threshold = check_threshold(pixel_threshold, "pixel threshold")
    method = DedupMethod(method)
    if method == DedupMethod.AUTO:
        method = DedupMethod.EXACT if len(index) <= EXACT_LIMIT else DedupMethod.FAISS
    if method == DedupMethod.EXACT:
        rows_a, rows_b, _ = similar_pairs(index.embeddings, threshold, block_rows, max_pairs)
    else:
        rows_a, rows_b, _ = similar_pairs_faiss(index.embeddings, threshold, config or index.config, max_pairs)
    candidates, unreadable = len(rows_a), []
    if pixel_threshold is not None:
        check = pixels.pixel_scores(index.items.paths, rows_a, rows_b, max_image_pixels, progress)
        keep = pixels.confirmed(check.scores, pixel_threshold)
        rows_a, rows_b, unreadable = rows_a[keep], rows_b[keep], check.unreadable
    groups = [_group(index, members) for members in pair_components(len(index), rows_a, rows_b)]
    groups.sort(key=lambda group: (-len(group), group.ids[0]))
    seconds = time.perf_counter() - started
    return DedupReport(
        threshold, pixel_threshold, len(index), method.value, candidates, len(rows_a), groups, seconds, unreadable
    )


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not 0 < threshold <= 1:
        raise QueryError(f"the {name} must be a cosine in (0, 1], got {threshold!r}")
    return float(threshold)


def similar_pairs(
    embeddings: np.ndarray, threshold: float, block_rows: int = DEFAULT_BLOCK_ROWS, max_pairs: int = MAX_PAIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows `i < j` whose inner product is at least `threshold`, by an exact chunked self-join.

    Only blocks on or above the diagonal are multiplied (half the work of a full N x N product), each
    `block_rows` x `block_rows`, in float32 (a float16 or memory-mapped matrix is converted one block at a time).

    Returns:
        `(rows_a, rows_b, scores)`: int64, int64, float32 arrays, ordered by `rows_a` then `rows_b`.
    """
    return _collect(_self_join_blocks(embeddings, threshold, block_rows), max_pairs, threshold)


def _self_join_blocks(embeddings: np.ndarray, threshold: float, block_rows: int) -> Iterator[tuple[np.ndarray, ...]]:
    count = embeddings.shape[0]
    for top in range(0, count, block_rows):
        rows = np.ascontiguousarray(embeddings[top : top + block_rows], dtype=np.float32)
        for left in range(top, count, block_rows):
            found = join_block(rows, top, embeddings, left, threshold, block_rows)
            if found is not None:
                yield found


def join_block(
    rows: np.ndarray, top: int, embeddings: np.ndarray, left: int, threshold: float, block_rows: int
) -> Optional[tuple[np.ndarray, ...]]:
    """The pairs of one block of the self-join: `rows` (float32 rows `top...`) against rows `left...` (`left >= top`).

    Returns `(rows_a, rows_b, scores)` with `rows_a < rows_b`, or None when the block holds no pair.
    """
    columns = rows if left == top else np.asarray(embeddings[left : left + block_rows], dtype=np.float32)
    scores = rows @ columns.T
    # Most rows of most blocks have no pair: a row maximum is much cheaper than `nonzero` on every row.
    hot = np.flatnonzero(scores.max(axis=1) >= threshold)
    if hot.size == 0:
        return None
    hot_rows, hot_columns = np.nonzero(scores[hot] >= threshold)
    a, b = hot[hot_rows] + top, hot_columns.astype(np.int64) + left
    upper = b > a  # on the diagonal block: each pair once, no item with itself
    return a[upper], b[upper], scores[hot[hot_rows[upper]], hot_columns[upper]]


def similar_pairs_faiss(
    embeddings: np.ndarray, threshold: float, config: IndexConfig = IndexConfig(), max_pairs: int = MAX_PAIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of `similar_pairs` from a FAISS IVF range search (`config.ivf_nlist`, `ivf_nprobe`): approximate.

    A pair is found when one of its vectors falls in a list probed for the other; raising `ivf_nprobe` finds more.
    """
    ann = AnnIndex.build(IndexKind.IVF, embeddings, config)
    # FAISS keeps inner products strictly above the radius; the float just below the threshold keeps "at least".
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))

    def blocks() -> Iterator[tuple[np.ndarray, ...]]:
        for first in range(0, embeddings.shape[0], _RANGE_QUERY_BLOCK):
            queries = np.ascontiguousarray(embeddings[first : first + _RANGE_QUERY_BLOCK], dtype=np.float32)
            limits, scores, found = ann.faiss_index.range_search(queries, radius)
            a = np.repeat(np.arange(first, first + len(queries), dtype=np.int64), np.diff(limits.astype(np.int64)))
            b = found.astype(np.int64)
            # Each pair once, as (lower row, higher row); found from both sides it is counted once below.
            keep = a != b
            a, b, scores = a[keep], b[keep], scores[keep]
            yield np.minimum(a, b), np.maximum(a, b), scores

    return _collect(blocks(), max_pairs, threshold, unique=True)


def _collect(blocks, max_pairs: int, threshold: float, unique: bool = False) -> tuple[np.ndarray, ...]:
    parts_a, parts_b, parts_s, total = [], [], [], 0
    for a, b, scores in blocks:
        total += len(a)
        if total > max_pairs * (2 if unique else 1):
            raise QueryError(
                f"more than {max_pairs:,} pairs reach the threshold {threshold:g}: most of the gallery would be one "
                "group. Raise the threshold"
            )
        parts_a.append(a)
        parts_b.append(b)
        parts_s.append(scores.astype(np.float32))
    if not parts_a:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float32)
    a, b, scores = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    order = np.lexsort((b, a))
    a, b, scores = a[order], b[order], scores[order]
    if unique and len(a):
        first = np.concatenate([[True], (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
        a, b, scores = a[first], b[first], scores[first]
    if len(a) > max_pairs:
        raise QueryError(f"more than {max_pairs:,} pairs reach the threshold {threshold:g}: raise the threshold")
    return a, b, scores


def pair_components(count: int, rows_a: np.ndarray, rows_b: np.ndarray) -> list[np.ndarray]:
    """The connected components of `count` nodes joined by the pairs, with two or more members (rows, increasing)."""
    if len(rows_a) == 0:
        return []
    graph = coo_matrix((np.ones(len(rows_a), np.int8), (rows_a, rows_b)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    grouped = np.flatnonzero(sizes[labels] >= 2)  # rows in a group, increasing
    order = np.argsort(labels[grouped], kind="stable")
    members = grouped[order]
    bounds = np.flatnonzero(np.diff(labels[members])) + 1
    return np.split(members, bounds)


def _group(index: ImageIndex, rows: np.ndarray) -> DuplicateGroup:
    vectors = np.asarray(index.embeddings[rows], dtype=np.float32)
    scores = vectors @ vectors[0]
    return DuplicateGroup(
        ids=[int(index.items.ids[row]) for row in rows],
        paths=[index.items.paths[row] for row in rows],
        scores=[round(float(score), 6) for score in scores],
    )


def write_groups_grid(report: DedupReport, path: Union[str, Path], max_groups: int = 50, **sheet_options) -> Path:
    """A PNG contact sheet with one row of thumbnails per group (the largest `max_groups`), each labelled with its
    id and cosine to the group's first image."""
    from dual_encoder.contact_sheet import Section, Tile, write_sheet

    if not report.groups:
        raise ImageIndexError("no near-duplicates to draw")
    sections = [
        Section(
            [Tile(p, f"#{i}  {s:.3f}") for i, p, s in zip(group.ids, group.paths, group.scores)],
            heading=f"group {number}: {len(group)} images",
        )
        for number, group in enumerate(report.groups[:max_groups], start=1)
    ]
    shown = "" if len(report.groups) <= max_groups else f", the largest {max_groups} shown"
    title = f"{len(report.groups)} groups of near-duplicates (cosine >= {report.threshold:g}{_confirmed(report)}){shown}"
    return write_sheet(title, sections, path, **{"columns": 8, "thumb": 96, **sheet_options})



def _confirmed(report: DedupReport) -> str:
    return "" if report.pixel_threshold is None else f", pixels >= {report.pixel_threshold:g}"
