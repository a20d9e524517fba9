"""Search benchmark, side by side in one run: our exact top-k vs. a full argsort vs. FAISS Flat, FAISS HNSW
recall and speed, resident memory of a loaded float16 index, and end-to-end query latency.

    python benchmarks/bench_search.py              # N = 10k, 100k, 1M (~15 min on 2 cores)
    python benchmarks/bench_search.py --quick      # N = 10k only
    python benchmarks/bench_search.py --sizes 100000 --skip-hnsw
    python benchmarks/bench_search.py --float16-only --sizes 1000000   # float16 vs float32 exact search (~1 min)

Prints markdown tables. Galleries are random unit vectors (D=256), the hardest case for HNSW, so
HNSW is built on them up to `--hnsw-uniform-max` (100k); a clustered gallery (labelled, closer to
real embeddings) is measured at the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dual_encoder.config import IndexConfig
from dual_encoder.index.ann import AnnIndex, IndexKind, import_faiss
from dual_encoder.index.items import ImageRecord
from dual_encoder.index.store import ImageIndex, ModelRecord
from dual_encoder.index.topk import exact_search

DIM = 256
K = 10
BATCH = 64
SINGLE_QUERIES = 16
RECALL_QUERIES = 256
EF_SEARCH = (64, 128, 256, 512)
CLUSTERS = 1000


def unit_vectors(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def clustered_vectors(count: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """Points around `centers` (cosine ~0.7 to their center): closer to real embeddings than uniform."""
    rng = np.random.default_rng(seed)
    vectors = centers[rng.integers(0, len(centers), count)] + rng.standard_normal((count, DIM), dtype=np.float32) / 16
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def argsort_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The Keras recipe's way: score everything, sort everything."""
    scores = queries @ gallery.T
    rows = np.argsort(-scores, axis=1)[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def count_disagreements(rows: np.ndarray, scores: np.ndarray, ref_rows: np.ndarray, ref_scores: np.ndarray) -> int:
    """Positions whose ids differ from the reference; scores must agree to float32 rounding."""
    assert np.allclose(scores, ref_scores, atol=1e-5), "scores differ beyond float32 rounding"
    return int((rows != ref_rows).sum())


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


# -- 1. exact search ----------------------------------------------------------------------------------


def bench_exact(size: int, gallery: np.ndarray, queries: np.ndarray) -> list[dict]:
    """Queries/s of each exact method at batch 1 and 64; ids are checked against a full sort of the same gallery."""
    faiss = import_faiss()
    flat = faiss.IndexFlatIP(DIM)
    flat.add(gallery)
    gallery16 = gallery.astype(np.float16)
    # (name, method, the float32 gallery whose full argsort is the reference)
    methods = [
        ("full argsort (recipe)", lambda q: argsort_search(gallery, q, K), gallery),
        ("ours (float32)", lambda q: exact_search(gallery, q, K), gallery),
        ("ours (float16 gallery)", lambda q: exact_search(gallery16, q, K), gallery16.astype(np.float32)),
        ("FAISS IndexFlatIP", lambda q: tuple(reversed(flat.search(q, K))), gallery),
    ]
    rows = []
    for batch in (1, BATCH):
        batch_queries = [queries[i : i + 1] for i in range(SINGLE_QUERIES)] if batch == 1 else [queries[:BATCH]]
        references: dict[int, list] = {}
        for name, method, reference_gallery in methods:
            key = id(reference_gallery)
            if key not in references:
                references[key] = [argsort_search(reference_gallery, q, K) for q in batch_queries]
            results = [method(q) for q in batch_queries]  # warm-up, and the results to compare
            repeats = 1 if name.startswith("full argsort") and size >= 1_000_000 else 3
            seconds = median_seconds(lambda: [method(q) for q in batch_queries], repeats)
            mismatches = sum(
                count_disagreements(*result, *reference) for result, reference in zip(results, references[key])
            )
            rows.append({
                "N": size, "batch": batch, "method": name,
                "qps": len(batch_queries) * batch / seconds, "ms_per_batch": 1000 * seconds / len(batch_queries),
                "id_mismatches": mismatches,
            })  # fmt: skip
    return rows


def bench_float16(size: int, gallery: np.ndarray, queries: np.ndarray, repeats: int = 15) -> list[dict]:
    """float16 vs float32 gallery, our exact search at batch 1 and 64: runs alternate (fair under a varying load),
    the best of `repeats` counts, and the ids must equal those of the float32 search of the widened gallery."""
    gallery16 = gallery.astype(np.float16)
    widened = gallery16.astype(np.float32)
    rows = []
    for batch in (1, BATCH):
        batch_queries = [queries[i : i + 1] for i in range(SINGLE_QUERIES)] if batch == 1 else [queries[:BATCH]]
        for q in batch_queries:
            assert np.array_equal(exact_search(gallery16, q, K)[0], exact_search(widened, q, K)[0])
        seconds: dict[str, list[float]] = {"float32": [], "float16": []}
        for _ in range(repeats):
            for name, matrix in (("float32", gallery), ("float16", gallery16)):
                started = time.perf_counter()
                for q in batch_queries:
                    exact_search(matrix, q, K)
                seconds[name].append(time.perf_counter() - started)
        qps = {name: len(batch_queries) * batch / min(times) for name, times in seconds.items()}
        rows.append({
            "N": size, "batch": batch, "float32 q/s": qps["float32"], "float16 q/s": qps["float16"],
            "float16 / float32": qps["float16"] / qps["float32"],
            "float16 memory / float32": gallery16.nbytes / gallery.nbytes,
        })  # fmt: skip
    return rows


# -- 2. HNSW ------------------------------------------------------------------------------------------


def bench_hnsw(size: int, gallery: np.ndarray, queries: np.ndarray, label: str) -> list[dict]:
    config = IndexConfig(kind="hnsw")
    started = time.perf_counter()
    ann = AnnIndex.build(IndexKind.HNSW, gallery, config)
    build_seconds = time.perf_counter() - started
    truth, _ = exact_search(gallery, queries, K)
    exact_seconds = median_seconds(lambda: exact_search(gallery, queries, K), 3)
    exact_qps = len(queries) / exact_seconds
    rows = []
    for ef in EF_SEARCH:
        ann.faiss_index.hnsw.efSearch = ef
        found, _ = ann.search(queries, K)
        seconds = median_seconds(lambda: ann.search(queries, K), 3)
        qps = len(queries) / seconds
        rows.append({
            "N": size, "data": label, "M": config.hnsw_m, "efConstruction": ann.params["ef_construction"],
            "efSearch": ef, "build_s": build_seconds, "recall@10": recall_at_k(found, truth),
            "qps": qps, "exact_qps": exact_qps, "speedup_vs_exact": qps / exact_qps,
        })  # fmt: skip
    return rows


# -- 3. memory ----------------------------------------------------------------------------------------

_MEASURE_RSS = """
import json, sys
import numpy as np
import psutil
process = psutil.Process()
from dual_encoder.index.store import ImageIndex
baseline = process.memory_info().rss
index = ImageIndex.load(sys.argv[1])
loaded = process.memory_info().rss
index.search(np.ones((1, index.dim), np.float32) / index.dim ** 0.5, 10)  # touches every embedding page
searched = process.memory_info().rss
print(json.dumps({"loaded": loaded - baseline, "after_search": searched - baseline}))
"""


def bench_memory(size: int, workdir: Path) -> dict:
    vectors = unit_vectors(size, seed=11)
    records = [
        ImageRecord(path=f"/gallery/{i:07d}.jpg", sha256=f"{i:064x}", size=50_000, mtime=1.7e9) for i in range(size)
    ]
    config = IndexConfig(dtype="float16", kind="exact")
    ImageIndex.create(vectors, records, config, ModelRecord("/models/bench", "0" * 64)).save(workdir / "memory.index")
    del vectors, records
    command = [sys.executable, "-c", _MEASURE_RSS, str(workdir / "memory.index")]
    measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    embeddings = (workdir / "memory.index" / "embeddings.npy").stat().st_size
    total = sum(p.stat().st_size for p in (workdir / "memory.index").iterdir())
    return {"N": size, "embeddings_bytes": embeddings, "index_bytes": total, **measured}


# -- 4. end to end ------------------------------------------------------------------------------------


def bench_end_to_end(size: int, queries_count: int = 200) -> dict:
    from dual_encoder.config import Config
    from dual_encoder.data.synthetic import example_queries
    from dual_encoder.models import build_dual_encoder
    from dual_encoder.search import Searcher

    model_config = Config.from_preset("synthetic-small").model
    texts = example_queries(queries_count, seed=0)
    model = build_dual_encoder(model_config, captions=example_queries(2000, seed=1))
    records = [ImageRecord(path=f"/gallery/{i:06d}.png", sha256=f"{i:064x}") for i in range(size)]
    gallery = unit_vectors(size, seed=5, dim=model_config.heads.embed_dim)
    index = ImageIndex.create(gallery, records, IndexConfig(), ModelRecord("/m", "0" * 64))
    searcher = Searcher(index, model)
    searcher.search(texts[0], k=K)  # trace the text tower once
    latencies, search_only = [], []
    for text in texts:
        started = time.perf_counter()
        searcher.search(text, k=K)
        latencies.append(time.perf_counter() - started)
    vectors = searcher.encode_queries(texts)
    for vector in vectors:
        started = time.perf_counter()
        index.search(vector[None], K)
        search_only.append(time.perf_counter() - started)
    milliseconds = np.array(latencies) * 1000
    return {
        "N": size, "dim": model_config.heads.embed_dim, "text_backbone": model_config.text.backbone,
        "p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99)),
        "search_only_p50_ms": float(np.percentile(np.array(search_only) * 1000, 50)),
    }  # fmt: skip


# -- report -------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key in header) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def exact_ratios(rows: list[dict]) -> list[dict]:
    ratios = []
    for size in sorted({r["N"] for r in rows}):
        for batch in (1, BATCH):
            qps = {r["method"]: r["qps"] for r in rows if r["N"] == size and r["batch"] == batch}
            ours = qps["ours (float32)"]
            ratios.append({
                "N": size, "batch": batch,
                "ours / argsort": ours / qps["full argsort (recipe)"],
                "ours / FAISS Flat": ours / qps["FAISS IndexFlatIP"],
                "ours f16 / FAISS Flat": qps["ours (float16 gallery)"] / qps["FAISS IndexFlatIP"],
            })  # fmt: skip
    return ratios


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:.0f}s] {message} done", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="N = 10k only")
    parser.add_argument("--skip-hnsw", action="store_true")
    parser.add_argument("--float16-only", action="store_true", help="only float16 vs float32 exact search")
    parser.add_argument(
        "--hnsw-uniform-max", type=int, default=100_000,
        help="largest uniform gallery to build HNSW on (1M takes ~15 min more and reaches recall@10 < 0.2)",
    )  # fmt: skip
    parser.add_argument("--memory-size", type=int, help="gallery size for the RSS test (default: the largest)")
    parser.add_argument("--e2e-size", type=int, default=100_000)
    args = parser.parse_args()
    sizes = [10_000] if args.quick else sorted(args.sizes)
    started = time.perf_counter()
    print(f"machine: {os.cpu_count()} CPUs, numpy {np.__version__}, faiss {import_faiss().__version__}\n")

    exact_rows, hnsw_rows, float16_rows = [], [], []
    queries = unit_vectors(max(RECALL_QUERIES, BATCH), seed=1)
    for size in sizes:
        gallery = unit_vectors(size, seed=0)
        float16_rows += bench_float16(size, gallery, queries)
        log(started, f"float16 vs float32, N={size:,}")
        if args.float16_only:
            continue
        exact_rows += bench_exact(size, gallery, queries)
        log(started, f"exact search, N={size:,}")
        if not args.skip_hnsw and size <= args.hnsw_uniform_max:
            hnsw_rows += bench_hnsw(size, gallery, queries[:RECALL_QUERIES], "uniform")
            log(started, f"HNSW on uniform vectors, N={size:,}")
        del gallery
    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("## Exact top-10, float16 vs float32 gallery: queries/s (alternating runs, best of 15)\n")
    print(markdown(float16_rows) + "\n")
    if args.float16_only:
        return
    if not args.skip_hnsw:
        centers = unit_vectors(CLUSTERS, seed=3)
        clustered = clustered_vectors(sizes[-1], seed=4, centers=centers)
        queries = clustered_vectors(RECALL_QUERIES, seed=6, centers=centers)
        hnsw_rows += bench_hnsw(sizes[-1], clustered, queries, f"clustered ({CLUSTERS} centers)")
        log(started, f"HNSW on clustered vectors, N={sizes[-1]:,}")
        del clustered

    print("## Exact top-10: queries/s (median of 3; the 1M argsort runs once)\n")
    print(markdown(exact_rows) + "\n")
    print("## Ratios of queries/s\n")
    print(markdown(exact_ratios(exact_rows)) + "\n")
    if hnsw_rows:
        print(f"## FAISS HNSW vs exact, batch of {RECALL_QUERIES} queries\n")
        print(markdown(hnsw_rows) + "\n")

    with tempfile.TemporaryDirectory(dir=".") as workdir:
        memory = bench_memory(args.memory_size or sizes[-1], Path(workdir))
    memory["rss_after_search / embeddings file"] = memory["after_search"] / memory["embeddings_bytes"]
    memory["rss_after_search / index dir"] = memory["after_search"] / memory["index_bytes"]
    print("## Resident memory of a loaded float16 index (RSS delta, fresh process)\n")
    print(markdown([memory]) + "\n")

    print("## End to end: one query string -> top-10 (text tower + exact search)\n")
    print(markdown([bench_end_to_end(args.e2e_size)]) + "\n")
    print(f"total time: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
