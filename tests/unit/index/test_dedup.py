"""Near-duplicates: the exact chunked self-join and the FAISS range search against brute force, grouping by connected
components, the report and its contact sheet (the pixel check of candidates: test_pixels.py)."""

import json

import numpy as np
import pytest
from PIL import Image

from dual_encoder.config import IndexConfig
from dual_encoder.index import ImageIndex, ImageRecord, ModelRecord, QueryError, find_duplicates
from dual_encoder.index.dedup import pair_components, similar_pairs, similar_pairs_faiss, write_groups_grid
from tests.unit.index.helpers import unit_vectors, write_images


def _planted(count=600, dim=32, seed=0):
    """Random unit vectors plus near copies: 3 copies of row 0, 1 of rows 1..9 (cosine ~0.99), one chain 20-21-22."""
    rng = np.random.default_rng(seed)
    base = unit_vectors(count, dim, seed)
    sources = [0, 0, 0] + list(range(1, 10))
    copies = base[sources] + 0.015 * rng.standard_normal((len(sources), dim)).astype(np.float32)
    vectors = np.concatenate([base, copies])
    # A chain: 21 is close to 20 and to 22, which are not close to each other.
    direction = unit_vectors(1, dim, seed + 1)[0]
    vectors[20], vectors[21], vectors[22] = base[20], base[20] + 0.3 * direction, base[20] + 0.6 * direction
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_force(vectors, threshold):
    scores = vectors.astype(np.float32) @ vectors.astype(np.float32).T
    a, b = np.triu_indices(len(vectors), 1)
    keep = scores[a, b] >= threshold
    return a[keep], b[keep], scores[a, b][keep]


@pytest.mark.parametrize("block_rows", [1, 7, 64, 600, 4096])
def test_the_chunked_self_join_finds_exactly_the_pairs_of_a_full_product(block_rows):
    vectors = _planted()
    a, b, scores = similar_pairs(vectors, 0.95, block_rows=block_rows)
    ref_a, ref_b, ref_scores = _brute_force(vectors, 0.95)
    assert len(ref_a) > 12  # the planted copies, and the copies of row 0 among themselves
    np.testing.assert_array_equal(a, ref_a)
    np.testing.assert_array_equal(b, ref_b)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    assert np.all(a < b)


def test_the_self_join_reads_float16_memory_maps_block_by_block(tmp_path):
    vectors = _planted().astype(np.float16)
    np.save(tmp_path / "e.npy", vectors)
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    a, b, _ = similar_pairs(mapped, 0.9, block_rows=100)
    ref_a, ref_b, _ = _brute_force(vectors, 0.9)
    assert list(zip(a, b)) == list(zip(ref_a, ref_b))


def test_the_faiss_range_search_probing_every_list_equals_the_exact_join():
    vectors = _planted()
    config = IndexConfig(ivf_nlist=8, ivf_nprobe=8)
    a, b, scores = similar_pairs_faiss(vectors, 0.95, config)
    ref_a, ref_b, ref_scores = _brute_force(vectors, 0.95)
    assert list(zip(a, b)) == list(zip(ref_a, ref_b))
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_a_pair_exactly_at_the_threshold_counts():
    vectors = np.array([[1.0, 0.0], [0.5, np.sqrt(0.75)], [0.0, 1.0]], np.float32)
    threshold = float(np.float32(vectors[0] @ vectors[1]))
    assert list(zip(*similar_pairs(vectors, threshold)[:2])) == [(0, 1), (1, 2)]
    assert list(zip(*similar_pairs_faiss(vectors, threshold, IndexConfig(ivf_nlist=1))[:2])) == [(0, 1), (1, 2)]


def test_groups_are_connected_components_of_the_pairs():
    groups = pair_components(9, np.array([0, 1, 5, 6]), np.array([1, 2, 8, 5]))
    assert [g.tolist() for g in groups] == [[0, 1, 2], [5, 6, 8]]
    assert pair_components(4, np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


def _index(vectors, dtype="float32"):
    records = [ImageRecord(path=f"/photos/{row:04d}.jpg", sha256=f"{row:064x}") for row in range(len(vectors))]
    return ImageIndex.create(vectors, records, IndexConfig(dtype=dtype), ModelRecord("/m", "f" * 64))


def test_find_duplicates_reports_groups_largest_first_with_scores_to_the_first_member():
    vectors = _planted()
    index = _index(vectors)
    index.remove([5])  # ids survive removal: groups name ids, not rows
    report = find_duplicates(index, threshold=0.95, method="exact", pixel_threshold=None)

    assert report.method == "exact" and report.count == len(vectors) - 1
    assert [group.ids for group in report.groups[:2]] == [[0, 600, 601, 602], [20, 21, 22]]
    assert report.groups[0].paths[0] == "/photos/0000.jpg"
    assert report.groups[0].scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(0.95 <= score <= 1.0 + 1e-6 for score in report.groups[0].scores)
    assert report.groups[1].scores[2] < 0.95  # a chain: 22 joins 20 through 21
    # Row 5 is gone, so its copy (id 607) has no partner.
    assert all(607 not in group.ids for group in report.groups)
    assert report.sizes == {2: 8, 3: 1, 4: 1}
    assert report.duplicates == 3 + 2 + 8
    assert report.pairs == len(_brute_force(index.embeddings, 0.95)[0])
    shape = json.loads(json.dumps(report.to_dict()))
    assert shape["sizes"] == {"2": 8, "3": 1, "4": 1} and shape["groups_total"] == 10
    assert shape["groups"][0]["items"][1] == {"id": 600, "path": "/photos/0600.jpg", "score": report.groups[0].scores[1]}

    faiss_report = find_duplicates(
        index, threshold=0.95, method="faiss", config=IndexConfig(ivf_nlist=4, ivf_nprobe=4), pixel_threshold=None
    )
    assert faiss_report.method == "faiss" and [g.ids for g in faiss_report.groups] == [g.ids for g in report.groups]


def test_find_duplicates_reads_a_saved_float16_index(tmp_path):
    _index(_planted(), dtype="float16").save(tmp_path / "ix")
    report = find_duplicates(tmp_path / "ix", threshold=0.95, pixel_threshold=None)
    assert report.method == "exact" and report.groups[0].ids == [0, 600, 601, 602]


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, "0.9", True, float("nan")])
def test_the_threshold_is_a_cosine_in_0_1(threshold):
    with pytest.raises(QueryError, match=r"threshold must be a cosine in \(0, 1\]"):
        find_duplicates(_index(_planted(50)), threshold=threshold)


def test_a_threshold_that_joins_everything_is_refused_not_run_out_of_memory():
    vectors = np.tile(np.array([[1.0, 0.0]], np.float32), (300, 1))  # all the same
    with pytest.raises(QueryError, match="pairs reach the threshold 0.9: .*Raise the threshold"):
        find_duplicates(_index(vectors), threshold=0.9, max_pairs=1000)


def test_the_grid_has_one_row_of_thumbnails_per_group(tmp_path):
    paths = write_images(tmp_path / "photos", 5)
    vectors = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    records = [ImageRecord(path=str(p), sha256=f"{i:064x}") for i, p in enumerate(paths)]
    index = ImageIndex.create(vectors, records, IndexConfig(), ModelRecord("/m", "f" * 64))
    report = find_duplicates(index, pixel_threshold=None)  # the tiles differ: only the embeddings say alike
    assert [g.ids for g in report.groups] == [[0, 1], [2, 3]]
    sheet = write_groups_grid(report, tmp_path / "dups.png", thumb=40, columns=4)
    with Image.open(sheet) as image:
        # Title, then per group a heading and one row of tiles: 20 + 2 * (16 + 60).
        assert image.size == (2 * 44 + 4, 20 + 2 * (16 + 60))
        assert image.getpixel((4 + 20, 20 + 16 + 20)) != (255, 255, 255)  # group 1, first tile: pixels
