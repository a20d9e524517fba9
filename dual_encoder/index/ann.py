"""Approximate inner-product search with FAISS (HNSW, IVF, or compressed IVF-PQ); faiss is imported only when used.

`hnsw` and `ivf` hold float32 copies of the vectors and label them by gallery row. `ivfpq` holds only short
product-quantised codes (32 or 64 bytes for a 256-d vector instead of 1 KiB), labels them by item id so that
removing items does not shift the others, and re-ranks a shortlist exactly against the stored embeddings,
which stay memory-mapped on disk. It is trained on a sample and filled a chunk at a time, so a gallery of 10M+
float16 embeddings is never held as float32, and its file is memory-mapped on load.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dual_encoder.config import IndexConfig
from dual_encoder.index.errors import AnnUnavailableError, IndexConfigError
from dual_encoder.index.topk import FLOAT16_SCALE_EXPONENT, widen_float16

# Graph quality at build time. 100 (FAISS defaults to 40) lifts recall@10 on 1M clustered vectors from
# ~0.86 to ~0.99 at efSearch 128, for ~2.5x the build time, which is small next to embedding the images.
HNSW_EF_CONSTRUCTION = 100
# k-means wants ~39 training points per list (FAISS warns below that): the automatic nlist respects it.
IVF_MIN_POINTS_PER_LIST = 39
# IVF-PQ: training points per list by default, and the least any training sample has (PQ's 256 centroids
# per sub-quantizer want ~39 points each).
IVFPQ_TRAIN_POINTS_PER_LIST = IVF_MIN_POINTS_PER_LIST
IVFPQ_MIN_TRAIN = 10_000
IVFPQ_MIN_ITEMS = 256  # k-means of each 8-bit sub-quantizer needs at least one point per centroid
# k-means and OPQ iterations: FAISS's defaults (25 and 50) cost 2.5-5x the training time for codes that re-ranking
# makes no better (recall@10 after re-ranking 256 was 1.0 either way on 200k clustered vectors).
TRAIN_ITERATIONS = 10
# Vectors converted to float32 and added per step: the gallery is never materialised as float32.
ADD_CHUNK_ROWS = 262_144
# From this many vectors the default codes are twice as long (dim / 4 bytes). The more vectors share a neighbourhood,
# the finer the codes must rank them for the true top 10 to reach the shortlist: on 10M clustered 256-d vectors
# (10,000 per cluster) a 512 shortlist gave recall@10 0.79 with 32-byte codes and 0.92 with 64-byte codes, 742 MiB
# resident (BENCHMARKS.md; both before the build filed vectors at efSearch 128, below); on 1M vectors with 10,000 per
# cluster and 1,265 lists, 0.84 and 0.99.
IVFPQ_LONG_CODES_FROM = 2_000_000
# Neighbours per node of the HNSW graph over the IVF centroids (the coarse quantizer), and how wide its search is.
IVFPQ_QUANTIZER_M = 32
IVFPQ_QUANTIZER_EF_SEARCH = 128
# Rebuilding is worth it once the gallery has changed this much since training: the lists and codes were fit to
# the training sample's distribution.
REBUILD_GROWTH = 2.0
SAMPLE_SEED = 0


class IndexKind(str, enum.Enum):
    """How an index searches: `exact` (chunked matrix product), `hnsw`, `ivf` or `ivfpq` (FAISS)."""

    EXACT = "exact"
    HNSW = "hnsw"
    IVF = "ivf"
    IVFPQ = "ivfpq"


AUTO_KIND = "auto"


def resolve_kind(config: IndexConfig, count: int) -> IndexKind:
    """The kind `config.kind` asks for; `auto` is exact below `ann_threshold` items, HNSW up to
    `ivfpq_threshold`, and IVF-PQ from there on."""
    if config.kind == AUTO_KIND:
        if count < config.ann_threshold:
            return IndexKind.EXACT
        return IndexKind.HNSW if count < config.ivfpq_threshold else IndexKind.IVFPQ
    try:
        return IndexKind(config.kind)
    except ValueError:
        choices = [kind.value for kind in IndexKind] + [AUTO_KIND]
        raise IndexConfigError(f"unknown index kind '{config.kind}'; choose one of {choices}") from None


def import_faiss():
    """The `faiss` module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise AnnUnavailableError(
            "approximate search needs faiss: pip install 'dual_encoder[ann]' (or faiss-cpu)"
        ) from error
    return faiss


class AnnIndex:
    """A FAISS index over the rows of an embedding matrix, searched by inner product.

    For `hnsw` and `ivf`, FAISS label `i` is gallery row `i`; for `ivfpq` it is the item id of the row, and the
    shortlist FAISS finds is re-ranked exactly against the embeddings. `search` returns gallery rows either way.

    Args:
        kind: an approximate `IndexKind`.
        faiss_index: the built FAISS index.
        params: the build and search parameters, as recorded in the index manifest.
    """

    def __init__(self, kind: IndexKind, faiss_index: Any, params: dict[str, Any], mapped: bool = False):
        self.kind = kind
        self.faiss_index = faiss_index
        self.params = dict(params)
        self.mapped = mapped  # its data is a view of the file: FAISS aborts the process on any change to it
        _SEARCH_KNOBS[kind](import_faiss(), faiss_index, self.params)

    @property
    def labels_are_ids(self) -> bool:
        return self.kind == IndexKind.IVFPQ

    @classmethod
    def build(
        cls, kind: IndexKind, embeddings: np.ndarray, config: IndexConfig, ids: Optional[np.ndarray] = None
    ) -> "AnnIndex":
        """Build a `kind` index over `embeddings` (`[N, D]`, float16 or float32, may be memory-mapped).

        Args:
            ids: the item id of each row (`ivfpq` labels its vectors with them); default `0..N-1`.
        """
        ids = np.arange(len(embeddings), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        faiss_index, params = _BUILDERS[kind](import_faiss(), embeddings, ids, config)
        return cls(kind, faiss_index, params)

    @classmethod
    def load(cls, kind: IndexKind, path: str | Path, params: dict[str, Any], mmap: bool = False) -> "AnnIndex":
        """Read a saved index; with `mmap`, the kinds that allow it map their file instead of reading it (a change
        then first copies it into memory)."""
        faiss = import_faiss()
        flags = faiss.IO_FLAG_MMAP_IFC if mmap and mappable(kind, params) else 0
        return cls(kind, faiss.read_index(str(path), flags), params, mapped=bool(flags))

    def save(self, path: str | Path) -> None:
        import_faiss().write_index(self.faiss_index, str(path))

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
        """Append rows (with their item ids); they get the next labels, matching their rows in the gallery."""
        self._own()
        if self.labels_are_ids:
            _add_in_chunks(self.faiss_index, embeddings, np.asarray(ids, dtype=np.int64))
        else:
            self.faiss_index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    def remove_ids(self, ids: np.ndarray) -> None:
        """Drop the vectors of these item ids in place (kinds labelled by id only)."""
        faiss = import_faiss()
        self._own()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        removed = self.faiss_index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        if removed != len(ids):
            raise IndexConfigError(f"removed {removed} of {len(ids)} vectors from the {self.kind.value} index")

    def _own(self) -> None:
        """Copy a memory-mapped structure into memory before changing it."""
        if self.mapped:
            faiss = import_faiss()
            self.faiss_index = faiss.deserialize_index(faiss.serialize_index(self.faiss_index))
            self.mapped = False
            _SEARCH_KNOBS[self.kind](faiss, self.faiss_index, self.params)

    @property
    def rebuild_due(self) -> bool:
        """Whether the gallery has grown or shrunk by `REBUILD_GROWTH`x since the structure was trained."""
        trained = self.params.get("trained_count")
        if not trained:
            return False
        return len(self) > REBUILD_GROWTH * trained or len(self) * REBUILD_GROWTH < trained

    def search(
        self, queries: np.ndarray, k: int, embeddings: np.ndarray, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(rows, scores)`, `[Q, k]` each, best first; row -1 where fewer than k were found.

        Args:
            queries: `[Q, D]` float32.
            k: results per query.
            embeddings: the gallery the structure was built from (re-ranking reads the shortlist's rows).
            ids: the item id of each gallery row (increasing), to turn id labels into rows.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.labels_are_ids:
            scores, rows = self.faiss_index.search(queries, k)
            return rows.astype(np.int64), scores
        shortlist = max(k, int(self.params.get("rerank", 0)))
        _, labels = self.faiss_index.search(queries, min(shortlist, max(1, len(self))))
        rows = np.searchsorted(ids, labels)
        found = (labels >= 0) & (rows < len(ids))
        found[found] = ids[rows[found]] == labels[found]
        rows = np.where(found, rows, -1)
        return rerank(embeddings, queries, rows, k)


def rerank(embeddings: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each query's candidate `rows` (-1 = none) by exact inner product, ties to the lower row.

    Only the candidates' rows are read (in increasing order, which is kind to a memory-mapped file), so the
    cost is the shortlist's, not the gallery's.
    """
    valid = rows >= 0
    wanted, inverse = np.unique(rows[valid], return_inverse=True)
    gathered = np.asarray(embeddings[wanted])
    scale = 1.0
    if gathered.dtype == np.float16 and np.all(np.abs(queries) < 2.0**14):
        # NumPy's float16 cast is slow: widen as exact search does, with the queries scaled to make up for it.
        vectors, scale = widen_float16(gathered, np.empty(gathered.shape, np.float32)), 2.0**FLOAT16_SCALE_EXPONENT
    else:
        vectors = gathered.astype(np.float32, copy=False)
    scores = np.full(rows.shape, -np.inf, dtype=np.float32)
    if len(wanted):
        where = np.zeros(rows.shape, dtype=np.int64)  # each candidate's row in `vectors` (a valid one for -1)
        where[valid] = inverse.reshape(-1)
        scaled = queries * np.float32(scale)
        # One matrix-vector product per query over its own rows: ~3x faster at 64 x 512 than one einsum over all
        # pairs (which copies every pair's two vectors) or one product of every row with every query.
        for query, candidates in enumerate(where):
            scores[query] = vectors[candidates] @ scaled[query]
        scores[~valid] = -np.inf
    # Sort by (-score, row); missing candidates (-inf, row -1) last.
    order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def _build_hnsw(faiss, embeddings: np.ndarray, ids, config: IndexConfig) -> tuple[Any, dict[str, Any]]:
    index = faiss.IndexHNSWFlat(embeddings.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    params = {"m": config.hnsw_m, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": config.hnsw_ef_search}
    return index, params


def _build_ivf(faiss, embeddings: np.ndarray, ids, config: IndexConfig) -> tuple[Any, dict[str, Any]]:
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = vectors.shape
    nlist = config.ivf_nlist or ivf_default_nlist(count)
    if nlist > count:
        raise IndexConfigError(f"ivf_nlist={nlist} is larger than the gallery ({count} items)")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    return index, {"nlist": nlist, "nprobe": min(config.ivf_nprobe, nlist)}


def _build_ivfpq(faiss, embeddings: np.ndarray, ids: np.ndarray, config: IndexConfig) -> tuple[Any, dict[str, Any]]:
    """Train on a sample of rows, then add every row in chunks, labelled by item id."""
    count, dim = embeddings.shape
    nlist = config.ivf_nlist or ivf_default_nlist(count)
    pq_m = config.pq_m or default_pq_m(dim, count)
    factory = config.ivfpq_factory or ivfpq_factory(dim, nlist, pq_m, config.opq)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise IndexConfigError(f"ivfpq_factory '{factory}' is not an IVF index FAISS can build: {message}") from None
    assign = _set_training_iterations(faiss, index, ivf)  # held until training is done: FAISS does not own it
    train_size = min(count, config.train_size or max(IVFPQ_MIN_TRAIN, IVFPQ_TRAIN_POINTS_PER_LIST * ivf.nlist))
    if train_size < IVFPQ_MIN_ITEMS or ivf.nlist > train_size:
        raise IndexConfigError(
            f"an ivfpq index of {ivf.nlist} lists needs at least {max(IVFPQ_MIN_ITEMS, ivf.nlist)} training vectors, "
            f"got {train_size}: use kind exact or hnsw for a gallery this small"
        )
    sample = np.sort(np.random.default_rng(SAMPLE_SEED).choice(count, size=train_size, replace=False))
    index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    ivf.clustering_index = None
    del assign
    # Each vector goes to the list the HNSW quantizer finds for it. At FAISS's default efSearch (16) that is often not
    # the nearest list, and a vector filed in a far list is never probed: recall@10 stopped at 0.968 whatever nprobe
    # and the shortlist (500k clustered vectors, 5,657 lists); searching as wide as queries do gave 0.996, for 1.7x
    # the build time.
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):  # a factory string of the user's may have a flat quantizer
        quantizer.hnsw.efSearch = IVFPQ_QUANTIZER_EF_SEARCH
    _add_in_chunks(index, embeddings, ids)
    params = {
        "factory": factory, "nlist": int(ivf.nlist), "nprobe": min(config.ivfpq_nprobe, int(ivf.nlist)),
        "quantizer_ef_search": IVFPQ_QUANTIZER_EF_SEARCH, "rerank": config.rerank,
        "train_size": int(train_size), "trained_count": int(count),
    }  # fmt: skip
    return index, params


def _set_training_iterations(faiss, index: Any, ivf: Any) -> Any:
    """Fewer k-means and OPQ iterations, no polysemous training, and k-means that assigns points with a flat (BLAS)
    index rather than the HNSW quantizer, which FAISS would otherwise rebuild and search in every iteration."""
    ivf.cp.niter = TRAIN_ITERATIONS
    assign = faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.clustering_index = assign
    if hasattr(ivf, "pq"):
        ivf.pq.cp.niter = TRAIN_ITERATIONS
        # Polysemous codes only serve Hamming-distance filtering, which we do not use; training them took 98% of
        # the time on a 20k x 64-d gallery.
        if hasattr(ivf, "do_polysemous_training"):  # not on fast-scan (4-bit) codes
            ivf.do_polysemous_training = False
    if isinstance(index, faiss.IndexPreTransform):
        for position in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(position))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = TRAIN_ITERATIONS
    return assign


def _add_in_chunks(index: Any, embeddings: np.ndarray, ids: np.ndarray) -> None:
    for start in range(0, len(embeddings), ADD_CHUNK_ROWS):
        chunk = np.ascontiguousarray(embeddings[start : start + ADD_CHUNK_ROWS], dtype=np.float32)
        index.add_with_ids(chunk, np.ascontiguousarray(ids[start : start + ADD_CHUNK_ROWS]))


def ivf_default_nlist(count: int) -> int:
    """4 * sqrt(N) lists, but never fewer training points per list than k-means needs."""
    return max(1, min(round(4 * math.sqrt(count)), count // IVF_MIN_POINTS_PER_LIST))


def default_pq_m(dim: int, count: int = 0) -> int:
    """One byte of code per 8 dimensions (32 bytes for 256-d), or per 4 from `IVFPQ_LONG_CODES_FROM` vectors (64
    bytes), rounded down to a divisor of `dim`."""
    per_byte = 4 if count >= IVFPQ_LONG_CODES_FROM else 8
    return next(m for m in range(max(1, dim // per_byte), 0, -1) if dim % m == 0)


def ivfpq_factory(dim: int, nlist: int, pq_m: int, opq: bool) -> str:
    """The FAISS index_factory string of an IVF-PQ with an HNSW coarse quantizer and `pq_m`-byte codes, e.g.
    `IVF12649_HNSW32,PQ128x4fs`.

    The codes are FAISS's fast-scan ones — two 4-bit sub-quantizers a byte, scanned with SIMD lookups — where
    `2 * pq_m` divides `dim`, else one 8-bit sub-quantizer a byte. At the same bytes fast-scan lists scan ~2x
    faster and re-ranking makes up for their coarser distances (1M clustered 256-d vectors, 64 bytes, shortlist
    512: recall@10 1.000 either way; BENCHMARKS.md)."""
    if dim % pq_m:
        raise IndexConfigError(f"pq_m={pq_m} does not divide the embedding dimension {dim}")
    codes = f"PQ{2 * pq_m}{_FAST_SCAN}" if dim % (2 * pq_m) == 0 else f"PQ{pq_m}"
    rotation = f"OPQ{2 * pq_m if codes.endswith('fs') else pq_m}," if opq else ""
    return f"{rotation}IVF{nlist}_HNSW{IVFPQ_QUANTIZER_M},{codes}"


def _set_hnsw_search(faiss, faiss_index: Any, params: dict[str, Any]) -> None:
    faiss_index.hnsw.efSearch = params["ef_search"]


def _set_ivf_search(faiss, faiss_index: Any, params: dict[str, Any]) -> None:
    faiss_index.nprobe = params["nprobe"]


def _set_ivfpq_search(faiss, faiss_index: Any, params: dict[str, Any]) -> None:
    ivf = faiss.extract_index_ivf(faiss_index)
    ivf.nprobe = params["nprobe"]
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(params["quantizer_ef_search"], params["nprobe"])


_BUILDERS: dict[IndexKind, Callable[..., tuple[Any, dict[str, Any]]]] = {
    IndexKind.HNSW: _build_hnsw,
    IndexKind.IVF: _build_ivf,
    IndexKind.IVFPQ: _build_ivfpq,
}
_SEARCH_KNOBS: dict[IndexKind, Callable[[Any, Any, dict[str, Any]], None]] = {
    IndexKind.HNSW: _set_hnsw_search,
    IndexKind.IVF: _set_ivf_search,
    IndexKind.IVFPQ: _set_ivfpq_search,
}
# Kinds whose file FAISS can map instead of reading (their inverted lists are used in place).
_MAPPABLE = frozenset({IndexKind.IVFPQ})
_FAST_SCAN = "x4fs"  # the factory suffix of 4-bit fast-scan PQ codes


def mappable(kind: IndexKind, params: dict[str, Any]) -> bool:
    """Whether FAISS can memory-map this index's file. It maps lists of 8-bit PQ codes; fast-scan lists (`...x4fs`)
    it copies into memory whatever the flag, so mapping the file as well would only double what is resident (300k
    256-d vectors: 32 MiB on the heap + 25 MiB mapped, against 34 MiB read)."""
    return kind in _MAPPABLE and _FAST_SCAN not in str(params.get("factory", ""))
