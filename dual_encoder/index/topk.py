"""Exact maximum-inner-product search: chunked float32 matrix products with a partial, tie-stable top-k."""

from __future__ import annotations

from typing import Optional

import numpy as np

# 64k rows x 256 dims is a 64 MiB float32 chunk: big enough for BLAS to run at full speed, small
# enough that a float16 or memory-mapped gallery is never materialised as float32 all at once.
DEFAULT_CHUNK_ROWS = 65_536
# Caps the [queries x chunk] score block (256 x 64k float32 = 64 MiB) for large query batches.
DEFAULT_QUERY_BLOCK = 256


def exact_search(
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `gallery` with the `k` largest inner products with each query, best first.

    The result equals a full sort of every score by (-score, row): ties go to the lower row.
    Each gallery chunk is scored in float32 (a float16 or memory-mapped gallery is converted one
    chunk at a time) and only rows that can still enter a query's top-k are kept, so the gallery
    is never sorted.

    Args:
        gallery: `[N, D]` float32 or float16 array (may be a `np.memmap`).
        queries: `[Q, D]` array.
        k: results per query, at least 1; clamped to `N`.
        chunk_rows: gallery rows scored per matrix product.
        query_block: queries scored per matrix product.

    Returns:
        `(rows, scores)`: int64 `[Q, min(k, N)]` gallery rows and their float32 scores.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(k), gallery.shape[0])
    rows = np.zeros((queries.shape[0], k), dtype=np.int64)
    scores = np.zeros((queries.shape[0], k), dtype=np.float32)
    # A first chunk of at least k rows gives every query k candidates to compare later chunks with.
    step = max(chunk_rows, k)
    # Converted chunks reuse one buffer: a fresh 64 MiB array per chunk costs page faults every time.
    shape = (min(step, gallery.shape[0]), gallery.shape[1])
    buffer = None if gallery.dtype == np.float32 else np.empty(shape, np.float32)
    for start in range(0, gallery.shape[0], step):
        chunk = np.asarray(gallery[start : start + step])  # a plain view, also of a np.memmap
        if buffer is not None:
            np.copyto(buffer[: len(chunk)], chunk)
            chunk = buffer[: len(chunk)]
        for first in range(0, queries.shape[0], query_block):
            block = slice(first, first + query_block)
            held = None if start == 0 else (rows[block], scores[block])
            rows[block], scores[block] = _merge(held, queries[block] @ chunk.T, start, k)
    return rows, scores


def _merge(
    held: Optional[tuple[np.ndarray, np.ndarray]], chunk_scores: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge one chunk's scores (gallery rows `offset...`) into each query's held top-k."""
    num_queries, chunk_size = chunk_scores.shape
    if held is None:
        # First chunk: keep everything at or above each query's k-th score, ties included.
        threshold = np.partition(chunk_scores, chunk_size - k, axis=1)[:, chunk_size - k, None]
        query_ids, columns = np.nonzero(chunk_scores >= threshold)
        held_rows = np.zeros((num_queries, 0), dtype=np.int64)
        held_scores = np.zeros((num_queries, 0), dtype=np.float32)
    else:
        held_rows, held_scores = held
        # Later chunks hold higher rows, which lose ties: only strictly better scores can enter.
        # Most queries have none, and a row maximum is much cheaper than `nonzero` on every row.
        hot = np.flatnonzero(chunk_scores.max(axis=1) > held_scores[:, -1])
        if hot.size == 0:
            return held_rows, held_scores
        hot_ids, columns = np.nonzero(chunk_scores[hot] > held_scores[hot, -1:])
        query_ids = hot[hot_ids]
    all_queries = np.concatenate([np.repeat(np.arange(num_queries), held_rows.shape[1]), query_ids])
    all_rows = np.concatenate([held_rows.ravel(), columns.astype(np.int64) + offset])
    all_scores = np.concatenate([held_scores.ravel(), chunk_scores[query_ids, columns]])
    order = np.lexsort((all_rows, -all_scores, all_queries))
    # Every query has at least k entries; its first k in (query, -score, row) order win.
    starts = np.concatenate([[0], np.cumsum(np.bincount(all_queries, minlength=num_queries))[:-1]])
    take = order[starts[:, None] + np.arange(k)]
    return all_rows[take], all_scores[take]
