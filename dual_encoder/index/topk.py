"""Exact maximum-inner-product search: chunked float32 matrix products with a partial, tie-stable top-k."""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading
from typing import Callable, Optional

import numpy as np

# 64k rows x 256 dims is a 64 MiB float32 chunk: big enough for BLAS to run at full speed, small
# enough that a float16 or memory-mapped gallery is never materialised as float32 all at once.
DEFAULT_CHUNK_ROWS = 65_536
# Caps the [queries x chunk] score block (256 x 64k float32 = 64 MiB) for large query batches.
DEFAULT_QUERY_BLOCK = 256
# A float16 gallery is widened to float32 in 1 MiB blocks (L2-sized: the three passes stay in cache), on threads.
# Up to `VECTOR_QUERIES` queries (memory-bound) each thread also scores its blocks while they are in cache, with
# matrix-vector products, which BLAS runs single-threaded; above it the widened chunk gets one matrix product on
# the main thread (worker threads calling a multi-threaded BLAS at once stall each other).
WIDEN_BLOCK_VALUES = 1 << 18
VECTOR_QUERIES = 4
WIDEN_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# `widen_float16` gives value * 2**-112; the queries are scaled by 2**112 to make up for it.
FLOAT16_SCALE_EXPONENT = 112
_EXPONENT_AND_MANTISSA = np.int32(-0x70002000)  # 0x8FFFE000: sign, then a float32's low 5 exponent bits, mantissa


def exact_search(
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `gallery` with the `k` largest inner products with each query, best first.

    The result equals a full sort of every score by (-score, row): ties go to the lower row.
    Each gallery chunk is scored in float32 (a float16 gallery is widened to float32 a cache-sized
    block at a time, see `widen_float16`) and only rows that can still enter a query's top-k are kept,
    so the gallery is never sorted nor materialised as float32 all at once.

    Args:
        gallery: `[N, D]` float32 or float16 array (may be a `np.memmap`); float16 values must be finite.
        queries: `[Q, D]` array.
        k: results per query, at least 1; clamped to `N`.
        chunk_rows: gallery rows scored per top-k merge.
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
    score = _float16_scorer(gallery, queries) if gallery.dtype == np.float16 else _float32_scorer(gallery, queries)
    for start in range(0, gallery.shape[0], step):
        stop = min(start + step, gallery.shape[0])
        for first in range(0, queries.shape[0], query_block):
            block = slice(first, first + query_block)
            held = None if start == 0 else (rows[block], scores[block])
            rows[block], scores[block] = _merge(held, score(block, start, stop), start, k)
    return rows, scores


Scorer = Callable[[slice, int, int], np.ndarray]


def _float32_scorer(gallery: np.ndarray, queries: np.ndarray) -> Scorer:
    """`score(block, start, stop)`: float32 scores of `queries[block]` against `gallery[start:stop]`."""
    gallery = np.asarray(gallery)  # a plain view, also of a np.memmap

    def score(block: slice, start: int, stop: int) -> np.ndarray:
        return queries[block] @ np.asarray(gallery[start:stop], dtype=np.float32).T

    return score


def _float16_scorer(gallery: np.ndarray, queries: np.ndarray) -> Scorer:
    """The same scores for a float16 gallery, widened a cache-sized block at a time.

    The queries are scaled by a power of two to make up for `widen_float16`'s 2**-112 (and the scores scaled
    back when large queries need a smaller factor): power-of-two scaling is exact, so every product and sum
    equals the float32 computation on the widened gallery. Widening is most of the work at small batches and a
    NumPy loop runs on one core, so there a chunk's blocks are shared among threads (NumPy releases the GIL).
    """
    gallery = np.asarray(gallery)
    peak = float(np.max(np.abs(queries))) if queries.size else 0.0
    # Keep |query| * 2**exponent below 2**126 (finite, with room for the sums); large queries give back the rest.
    give_back = max(0, math.frexp(peak)[1] - 14) if math.isfinite(peak) else 0
    scaled = queries * np.float32(2.0 ** (FLOAT16_SCALE_EXPONENT - give_back))
    block_rows = max(1, WIDEN_BLOCK_VALUES // max(1, gallery.shape[1]))
    buffers = threading.local()

    def block_buffer() -> np.ndarray:
        if getattr(buffers, "block", None) is None:
            buffers.block = np.empty((block_rows, gallery.shape[1]), np.float32)
        return buffers.block

    def score_rows(out: np.ndarray, chunk_queries: np.ndarray, offset: int, first: int, stop: int) -> None:
        for begin in range(first, stop, block_rows):
            end = min(begin + block_rows, stop)
            widened = widen_float16(gallery[begin:end], block_buffer()[: end - begin])
            for query, scores in zip(chunk_queries, out):  # matrix-vector products: single-threaded in BLAS
                np.dot(widened, query, out=scores[begin - offset : end - offset])

    chunk: dict = {}  # the widened chunk (larger batches) and its bounds, reused by every query block

    def widen_rows(offset: int, first: int, stop: int) -> None:
        for begin in range(first, stop, block_rows):
            end = min(begin + block_rows, stop)
            widen_float16(gallery[begin:end], chunk["buffer"][begin - offset : end - offset])

    def score(block: slice, start: int, stop: int) -> np.ndarray:
        chunk_queries = scaled[block]
        if len(chunk_queries) <= VECTOR_QUERIES:
            # Memory-bound: every thread widens a block and scores it while it is still in its core's cache.
            out = np.empty((len(chunk_queries), stop - start), np.float32)
            _in_threads(functools.partial(score_rows, out, chunk_queries), start, stop, block_rows)
        else:
            # Compute-bound: widen the whole chunk (threads, no BLAS), then one product on BLAS's threads, as
            # for float32. Many small products would each wait for BLAS's threads, which a busy machine delays.
            if chunk.get("bounds") != (start, stop):
                if chunk.get("buffer") is None or len(chunk["buffer"]) < stop - start:
                    chunk["buffer"] = np.empty((stop - start, gallery.shape[1]), np.float32)
                _in_threads(widen_rows, start, stop, block_rows)
                chunk["bounds"] = (start, stop)
            out = chunk_queries @ chunk["buffer"][: stop - start].T
        if give_back:
            out *= np.float32(2.0**give_back)
        return out

    return score


def _in_threads(work: Callable[[int, int, int], None], start: int, stop: int, block_rows: int) -> None:
    """`work(start, first, last)` over `[start, stop)` split into whole blocks, one share per thread."""
    blocks = -(-(stop - start) // block_rows)
    threads = min(WIDEN_THREADS, blocks)
    if threads <= 1:
        work(start, start, stop)
        return
    share = -(-blocks // threads) * block_rows
    jobs = [_pool().submit(work, start, first, min(first + share, stop)) for first in range(start, stop, share)]
    for job in jobs:
        job.result()


_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(WIDEN_THREADS, thread_name_prefix="dual-encoder-widen")
        return _POOL


def widen_float16(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`values` (finite float16) as float32 times 2**-112, exactly, in `out`: three vectorised integer passes.

    NumPy's own float16 -> float32 cast is a scalar loop (~1.7 ns a value here, as long as the whole float32
    matrix product at batch 64); these passes take ~0.2 ns. A float16's bits, sign-extended to 32 and shifted
    left by 13, put its exponent and mantissa where a float32's go and its sign at bit 31; the mask clears the
    three sign-extension bits left in the exponent. The result reads as a float32 whose exponent is 112 smaller
    than the float16's (unbiased: 127 - 15), subnormals included.
    """
    bits = out.view(np.int32)
    np.copyto(bits, values.view(np.int16))
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _EXPONENT_AND_MANTISSA, out=bits)
    return out


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
