"""Exact search: equal to a full (-score, row) sort, ties and float16 included, whatever the chunking."""

import numpy as np
import pytest

from dual_encoder.index import topk
from dual_encoder.index.topk import exact_search
from tests.unit.index.helpers import brute_force_top_k, unit_vectors


def _tied_gallery(rng: np.random.Generator, count: int, dim: int, dtype) -> np.ndarray:
    # Quarter-integers: every product and sum is exact in float32 (and float16 holds them), so equal
    # scores are true ties whatever order BLAS adds in. Duplicate rows add more ties.
    gallery = rng.integers(-2, 3, (count, dim)) / 4
    gallery[rng.integers(0, count, count // 3)] = gallery[rng.integers(0, count, count // 3)]
    return gallery.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk_rows, query_block", [(7, 3), (64, 256), (1000, 1), (100_000, 256)])
def test_exact_search_equals_brute_force_with_ties(dtype, chunk_rows, query_block):
    rng = np.random.default_rng(chunk_rows)
    gallery = _tied_gallery(rng, 700, 8, dtype)
    queries = (rng.integers(-2, 3, (20, 8)) / 4).astype(np.float32)
    for k in (1, 5, 37):
        rows, scores = exact_search(gallery, queries, k, chunk_rows=chunk_rows, query_block=query_block)
        expected_rows, expected_scores = brute_force_top_k(gallery, queries, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(scores, expected_scores)


def test_all_equal_scores_return_the_first_rows():
    gallery = np.ones((50, 4), np.float16)
    rows, _ = exact_search(gallery, np.ones((2, 4)), 5, chunk_rows=8)
    np.testing.assert_array_equal(rows, [[0, 1, 2, 3, 4]] * 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_search_on_unit_vectors_matches_a_float64_reference(dtype):
    gallery = unit_vectors(3000, 32, seed=1).astype(dtype)
    queries = unit_vectors(40, 32, seed=2)
    rows, scores = exact_search(gallery, queries, 10, chunk_rows=256)
    exact = queries.astype(np.float64) @ gallery.astype(np.float64).T
    reference = -np.sort(-exact, axis=1)[:, :10]
    # Scores agree to float32 rounding, and each returned row really has the returned score.
    np.testing.assert_allclose(scores, reference, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(exact, rows, axis=1), scores, atol=1e-6)
    assert all(len(set(r)) == 10 for r in rows)


def test_k_is_clamped_to_the_gallery_and_must_be_positive():
    gallery = unit_vectors(3, 4, seed=0)
    rows, scores = exact_search(gallery, gallery, 10)
    assert rows.shape == scores.shape == (3, 3)
    np.testing.assert_array_equal(rows[:, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="k must be at least 1"):
        exact_search(gallery, gallery, 0)


@pytest.mark.parametrize("num_queries", [1, 3, 9])  # matrix-vector products on worker threads, or one product
def test_float16_blocks_and_threads_equal_brute_force(monkeypatch, num_queries):
    # Tiny blocks: a chunk is widened in many blocks, spread over the threads, the last one short.
    monkeypatch.setattr(topk, "WIDEN_BLOCK_VALUES", 5 * 8)
    monkeypatch.setattr(topk, "WIDEN_THREADS", 3)
    rng = np.random.default_rng(num_queries)
    gallery = _tied_gallery(rng, 1000, 8, np.float16)
    queries = (rng.integers(-2, 3, (num_queries, 8)) / 4).astype(np.float32)
    rows, scores = exact_search(gallery, queries, 7, chunk_rows=97)
    expected_rows, expected_scores = brute_force_top_k(gallery, queries, 7)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)


def test_float16_widening_is_exact_for_every_finite_value():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 1)  # normals, subnormals, +-0, +-65504
    widened = topk.widen_float16(finite, np.empty(finite.shape, np.float32))
    np.testing.assert_array_equal(widened * np.float32(2.0**112), finite.astype(np.float32))


@pytest.mark.parametrize("scale", [1e-30, 1.0, 3e4, 1e30])
def test_float16_scores_equal_float32_scores_for_tiny_and_huge_queries(scale):
    gallery = unit_vectors(500, 16, seed=3).astype(np.float16)
    queries = unit_vectors(6, 16, seed=4) * np.float32(scale)
    rows, scores = exact_search(gallery, queries, 5)
    expected_rows, expected_scores = exact_search(gallery.astype(np.float32), queries, 5)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)
