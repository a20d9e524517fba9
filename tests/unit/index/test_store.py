"""The index on disk: round trip, memory-mapping, verification, ids, atomic replacement under SIGKILL."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dual_encoder.config import IndexConfig
from dual_encoder.index import (
    ImageIndex,
    ImageIndexError,
    ImageRecord,
    IndexConfigError,
    IndexCorruptError,
    IndexKind,
    IndexNotFoundError,
    ModelRecord,
    QueryError,
)
from dual_encoder.index.store import EMBEDDINGS, ITEMS, MANIFEST
from tests.unit.index.helpers import kill_during, unit_vectors

MODEL = ModelRecord("/models/tiny", "f" * 64)


def _records(count: int, first: int = 0) -> list[ImageRecord]:
    return [
        ImageRecord(path=f"/gallery/{i:05d}.jpg", sha256=f"{i:064x}", size=100 + i, mtime=1.5e9 + i,
                    caption=f"caption {i}" if i % 2 else None)
        for i in range(first, first + count)
    ]  # fmt: skip


def _index(count: int = 50, dim: int = 8, seed: int = 0, **config) -> ImageIndex:
    return ImageIndex.create(unit_vectors(count, dim, seed) * 3, _records(count), IndexConfig(**config), MODEL)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip_memory_maps_normalised_embeddings(tmp_path, dtype):
    index = _index(dtype=dtype)
    index.save(tmp_path / "gallery.index")
    loaded = ImageIndex.load(tmp_path / "gallery.index")

    assert isinstance(loaded.embeddings, np.memmap) and loaded.embeddings.dtype == np.dtype(dtype)
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings.astype(np.float32), axis=1), 1.0, atol=1e-3)
    assert (len(loaded), loaded.dim, loaded.kind, loaded.dtype) == (50, 8, IndexKind.EXACT, dtype)
    assert list(loaded.items) == list(index.items)
    assert loaded.items[3].caption == "caption 3" and loaded.items[2].caption is None
    queries = unit_vectors(4, 8, seed=9)
    for got, expected in zip(loaded.search(queries, 5), index.search(queries, 5)):
        np.testing.assert_array_equal(got, expected)
    manifest = json.loads((tmp_path / "gallery.index" / MANIFEST).read_text())
    assert manifest["count"] == 50 and manifest["dim"] == 8 and manifest["dtype"] == dtype
    assert manifest["model"] == {"dir": "/models/tiny", "fingerprint": "f" * 64}
    assert set(manifest["files"]) == {EMBEDDINGS, ITEMS}


def test_truncated_embeddings_are_refused_naming_the_file(tmp_path):
    _index().save(tmp_path / "ix")
    path = tmp_path / "ix" / EMBEDDINGS
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(IndexCorruptError, match=r"embeddings\.npy.*truncated"):
        ImageIndex.load(tmp_path / "ix")
    with pytest.raises(IndexCorruptError, match=r"embeddings\.npy"):
        ImageIndex.load(tmp_path / "ix", verify=False)  # sizes are checked even without hashing


@pytest.mark.parametrize("name", [EMBEDDINGS, ITEMS])
def test_altered_file_of_the_same_size_is_refused_naming_it(tmp_path, name):
    _index().save(tmp_path / "ix")
    path = tmp_path / "ix" / name
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=rf"{name.replace('.', '[.]')}: sha256 differs"):
        ImageIndex.load(tmp_path / "ix")


def test_missing_directory_and_missing_manifest_are_clear_errors(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index at"):
        ImageIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexCorruptError, match="manifest.json: missing"):
        ImageIndex.load(tmp_path / "empty")


def test_bad_config_values_are_clear_errors():
    with pytest.raises(IndexConfigError, match="unknown index dtype 'float64'"):
        _index(dtype="float64")
    with pytest.raises(IndexConfigError, match="unknown index kind 'fast'"):
        _index(kind="fast")


def test_search_validates_k_and_query_dimension():
    index = _index(count=5)
    rows, scores = index.search(unit_vectors(2, 8, seed=1), 100)
    assert rows.shape == (2, 5)  # clamped to the gallery
    for bad in (0, -1, 2.5, "3", True, None):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            index.search(unit_vectors(1, 8, seed=1), bad)
    with pytest.raises(QueryError, match=r"expected \[Q, 8\]"):
        index.search(np.ones((1, 4)), 3)


def test_ids_are_stable_across_remove_and_add_and_never_reused(tmp_path):
    index = _index(count=6)
    index.remove([0, 4])
    index.add(_records(2, first=100), unit_vectors(2, 8, seed=5))
    assert list(index.items.ids) == [1, 2, 3, 5, 6, 7]
    assert [index.items.row_of(i) for i in (1, 5, 7, 4)] == [0, 3, 5, None]
    index.save(tmp_path / "ix")
    index.remove([5])
    index.add(_records(1, first=200), unit_vectors(1, 8, seed=6))
    assert index.items.ids[-1] == 8  # 7 was removed, its id stays retired
    assert ImageIndex.load(tmp_path / "ix").next_id == 8
    # The vector added last is found as itself.
    rows, scores = index.search(unit_vectors(1, 8, seed=6), 1)
    assert index.items[rows[0, 0]].path == "/gallery/00200.jpg" and scores[0, 0] == pytest.approx(1.0)


def test_replacing_keeps_no_leftovers_and_swaps_content(tmp_path):
    _index(seed=0).save(tmp_path / "ix")
    _index(count=30, seed=1).save(tmp_path / "ix", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]
    assert len(ImageIndex.load(tmp_path / "ix")) == 30


def test_a_folder_that_is_not_an_index_is_never_replaced(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"precious")
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "photos", tmp_path / "file"):
        with pytest.raises(ImageIndexError, match="not replacing it|is not a directory"):
            _index().save(target)
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "empty").mkdir()
    assert len(ImageIndex.load(_index().save(tmp_path / "empty"))) == 50


def test_a_crash_between_the_two_renames_leaves_the_previous_index_loadable(tmp_path):
    _index(seed=0).save(tmp_path / "ix")
    before = _files(tmp_path / "ix")
    # The state a kill leaves between "target -> backup" and "staging -> target".
    os.rename(tmp_path / "ix", tmp_path / ".ix.previous")
    assert len(ImageIndex.load(tmp_path / "ix")) == 50
    _index(count=20, seed=2).save(tmp_path / "other")  # unrelated save: no effect on ix
    assert _files(tmp_path / ".ix.previous") == before
    _index(count=10, seed=3).save(tmp_path / "ix", overwrite=True)  # the next save of ix finishes the swap first
    assert len(ImageIndex.load(tmp_path / "ix")) == 10
    assert not (tmp_path / ".ix.previous").exists()


_WRITER = """
import sys
import numpy as np
from dual_encoder.config import IndexConfig
from dual_encoder.index import ImageIndex, ImageRecord, ModelRecord

count = int(sys.argv[2])
vectors = np.random.default_rng(7).standard_normal((count, 32)).astype(np.float32)
records = [ImageRecord(path=f"/new/{i}.jpg", sha256=f"{i:064x}") for i in range(count)]
index = ImageIndex.create(vectors, records, IndexConfig(), ModelRecord("/m", "e" * 64))
print("writing", flush=True)
index.save(sys.argv[1], overwrite=True)
print("done", flush=True)
"""


_NEW_COUNT = 60_000  # items.jsonl + embeddings: a save of about half a second


def _run_writer(target: Path, pristine: Path, kill_after: float) -> tuple[bool, float]:
    """Restore `pristine` at `target`, start a writer replacing it, SIGKILL it `kill_after` s into the save."""
    command = [sys.executable, "-c", _WRITER, str(target), str(_NEW_COUNT)]
    return kill_during(target, pristine, command, "writing", kill_after)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_old_or_the_new_index_complete(tmp_path):
    pristine, target = tmp_path / "pristine", tmp_path / "ix"
    _index(count=500, dim=32, seed=0).save(pristine)
    old = _files(pristine)
    finished, save_seconds = _run_writer(target, pristine, kill_after=60.0)
    assert finished and len(ImageIndex.load(target)) == _NEW_COUNT
    outcomes, killed_mid_write = [], 0
    for fraction in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.2):
        finished, _ = _run_writer(target, pristine, kill_after=fraction * save_seconds)
        loaded = ImageIndex.load(target)  # never a half-written index, whatever the moment
        if len(loaded) == 500:
            assert _files(target) == old  # the previous index, byte for byte
            outcomes.append("old")
        else:
            assert len(loaded) == _NEW_COUNT and loaded.items[-1].path == f"/new/{_NEW_COUNT - 1}.jpg"
            outcomes.append("new")
        killed_mid_write += any(p.name.startswith(".ix.tmp-") for p in tmp_path.iterdir())
    assert outcomes[0] == "old" and killed_mid_write >= 3, (outcomes, killed_mid_write)
    # The next save clears what killed writers left behind.
    _index(count=5).save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "pristine"]
