"""Exact maximum-inner-product search: chunked float32 matrix products with a partial, tie-stable top-k."""

from __future__ import annotations

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
        k: results per query; clamped to `N`.
        chunk_rows: gallery rows scored per matrix product.
        query_block: queries scored per matrix product.

    Returns:
        `(rows, scores)`: int64 `[Q, min(k, N)]` gallery rows and float32 scores.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    num_queries = queries.shape[0]
    k = min(int(k), gallery.shape[0])
    best_rows = np.zeros((num_queries, 0), dtype=np.int64)
    best_scores = np.zeros((num_queries, 0), dtype=np.float32)
    # A first chunk of at least k rows gives every query k candidates to compare later chunks with.
    step = max(chunk_rows, k)
    block_rows, block_scores = [], []
    for start in range(0, gallery.shape[0], step):
        chunk = np.asarray(gallery[start : start + step], dtype=np.float32)
        block_rows, block_scores = [], []
        for q in range(0, num_queries, query_block):
            scores = queries[q : q + query_block] @ chunk.T
            rows, top = _merge(best_rows[q : q + query_block], best_scores[q : q + query_block], scores, start, k)
            block_rows.append(rows)
            block_scores.append(top)
        best_rows = np.concatenate(block_rows) if block_rows else best_rows
        best_scores = np.concatenate(block_scores) if block_scores else best_scores
    return best_rows, best_scores


def _merge(
    best_rows: np.ndarray, best_scores: np.ndarray, scores: np.ndarray, offset: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge one chunk's `scores` (rows `offset...`) into the running top-k of each query."""
    num_queries, chunk_size = scores.shape
    if best_rows.shape[1] < k:
        # First chunk: keep everything at or above each query's k-th score (ties included).
        if chunk_size > k:
            threshold = np.partition(scores, chunk_size - k, axis=1)[:, chunk_size - k, None]
            candidates = scores >= threshold
        else:
            candidates = np.ones_like(scores, dtype=bool)
    else:
        # Later chunks hold higher rows, which lose ties: only strictly better scores can enter.
        candidates = scores > best_scores[:, -1:]
    query_ids, columns = np.nonzero(candidates)
    if query_ids.size == 0:
        return best_rows, best_scores
    held = best_rows.shape[1]
    all_queries = np.concatenate([np.repeat(np.arange(num_queries), held), query_ids])
    all_rows = np.concatenate([best_rows.ravel(), columns.astype(np.int64) + offset])
    all_scores = np.concatenate([best_scores.ravel(), scores[query_ids, columns]])
    order = np.lexsort((all_rows, -all_scores, all_queries))
    # Every query has at least k entries now; its first k in (query, -score, row) order win.
    starts = np.concatenate([[0], np.cumsum(np.bincount(all_queries, minlength=num_queries))[:-1]])
    take = order[starts[:, None] + np.arange(k)]
    return all_rows[take], all_scores[take]
