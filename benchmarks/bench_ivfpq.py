"""The compressed `ivfpq` index against exact search, in one run: build time, resident memory of the loaded index,
recall@10 after re-ranking, and queries/s at batch 1 and 64.

    python benchmarks/bench_ivfpq.py                      # 10M x 256 clustered vectors (~5 GB float16 on disk)
    python benchmarks/bench_ivfpq.py --size 1000000       # the scale knob
    python benchmarks/bench_ivfpq.py --size 200000 --opq  # with an OPQ rotation

The gallery is clustered unit vectors (1,000 random centres, cosine ~0.7 to their centre: closer to real embeddings
than uniform ones, on which no index beats exact search), generated a million at a time straight into a float16
`.npy` file, as `index build` stores them. The index is built from that memory-mapped file with the product's
defaults (`IndexConfig(kind="ivfpq")`: IVF with 4*sqrt(N) lists and an HNSW coarse quantizer, fast-scan PQ codes of 32 bytes,
64 from 2M vectors, trained on a sample, filled in chunks). Memory is measured in a fresh process that maps the index as `search` does;
pages of the embeddings file that re-ranking touched are reported apart, not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dual_encoder.config import IndexConfig
from dual_encoder.index.ann import AnnIndex, IndexKind, import_faiss
from dual_encoder.index.topk import exact_search

K = 10
BATCH = 64
CLUSTERS = 1000
GENERATE_ROWS = 1_000_000


def clustered(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors += rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def write_gallery(path: Path, size: int, centres: np.ndarray) -> np.ndarray:
    gallery = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(size, centres.shape[1]))
    for start in range(0, size, GENERATE_ROWS):
        stop = min(start + GENERATE_ROWS, size)
        gallery[start:stop] = clustered(stop - start, seed=1000 + start // GENERATE_ROWS, centres=centres)
    gallery.flush()
    del gallery
    return np.load(path, mmap_mode="r")


_MEASURE = """
import json, sys, time
import numpy as np
from dual_encoder.index.ann import AnnIndex, IndexKind

def resident():
    by_file, anon = {}, 0
    with open("/proc/self/smaps") as smaps:
        name = ""
        for line in smaps:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                name = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Rss:":
                by_file[name] = by_file.get(name, 0) + int(parts[1]) * 1024
            elif parts[0] == "Anonymous:":
                anon += int(parts[1]) * 1024
    return anon, by_file

index_path, embeddings_path, params, queries_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
queries = np.load(queries_path)
anon_before, _ = resident()
ann = AnnIndex.load(IndexKind.IVFPQ, index_path, params, mmap=True)
embeddings = np.load(embeddings_path, mmap_mode="r")
ids = np.arange(len(embeddings), dtype=np.int64)
for first in range(0, len(queries), 64):
    ann.search(queries[first:first + 64], 10, embeddings, ids)
anon_after, by_file = resident()
print(json.dumps({"anon": anon_after - anon_before, "index_file": by_file.get(index_path, 0),
                  "embeddings_file": by_file.get(embeddings_path, 0)}))
"""


def qps(search, queries: np.ndarray, batch: int, budget_s: float = 20.0, max_batches: int = 200) -> float:
    """Queries/s over consecutive batches, stopping after `budget_s` seconds (exact search at 10M is slow)."""
    done, started = 0, time.perf_counter()
    for first in range(0, min(len(queries), batch * max_batches), batch):
        search(queries[first : first + batch])
        done += len(queries[first : first + batch])
        if time.perf_counter() - started > budget_s:
            break
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000, help="gallery vectors (default 10M)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=256, help="queries for recall")
    parser.add_argument("--opq", action="store_true", help="rotate with OPQ before PQ (longer training)")
    parser.add_argument("--also-rerank", type=int, nargs="*", default=[],
                        help="further shortlist sizes to measure on the same index (search-time setting)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the gallery file goes (default: a temp dir here)")
    args = parser.parse_args()
    faiss = import_faiss()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, faiss {faiss.__version__}\n")
    centres = np.random.default_rng(3).standard_normal((CLUSTERS, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(dir=args.workdir or ".") as workdir:
        work = Path(workdir)
        started = time.perf_counter()
        gallery = write_gallery(work / "embeddings.npy", args.size, centres)
        generate_s = time.perf_counter() - started
        print(f"[{generate_s:.0f}s] generated {args.size:,} x {args.dim} float16", file=sys.stderr, flush=True)
        config = IndexConfig(kind="ivfpq", dtype="float16", opq=args.opq)
        started = time.perf_counter()
        ann = AnnIndex.build(IndexKind.IVFPQ, gallery, config)
        build_s = time.perf_counter() - started
        ann.save(work / "ann.faiss")
        print(f"[{build_s:.0f}s] built {ann.params}", file=sys.stderr, flush=True)
        ids = np.arange(args.size, dtype=np.int64)
        queries = clustered(max(args.queries, 2 * BATCH), seed=7, centres=centres)
        np.save(work / "queries.npy", queries)

        truth, _ = exact_search(gallery, queries[: args.queries], K)
        found, _ = ann.search(queries[: args.queries], K, gallery, ids)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))
        print(f"recall@10 {recall:.3f}", file=sys.stderr, flush=True)
        speed = {}
        for batch in (1, BATCH):
            speed[("ivfpq", batch)] = qps(lambda q: ann.search(q, K, gallery, ids), queries, batch)
            speed[("exact", batch)] = qps(lambda q: exact_search(gallery, q, K), queries, batch)
        print(f"speeds {speed}", file=sys.stderr, flush=True)
        more = []
        for rerank in args.also_rerank:
            other = AnnIndex(IndexKind.IVFPQ, ann.faiss_index, {**ann.params, "rerank": rerank})
            found, _ = other.search(queries[: args.queries], K, gallery, ids)
            more.append((rerank, float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])),
                         *(qps(lambda q: other.search(q, K, gallery, ids), queries, batch) for batch in (1, BATCH))))
        command = [sys.executable, "-c", _MEASURE, str(work / "ann.faiss"), str(work / "embeddings.npy"),
                   json.dumps(ann.params), str(work / "queries.npy")]  # fmt: skip
        memory = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        float32_bytes = args.size * args.dim * 4
        index_bytes = (work / "ann.faiss").stat().st_size

    print(f"## IVF-PQ vs exact search, {args.size:,} x {args.dim} clustered vectors ({CLUSTERS} centres), float16\n")
    print("| measure | result | goal |")
    print("|---|---:|---|")
    print(f"| factory | `{ann.params['factory']}` (nprobe {ann.params['nprobe']}, re-rank {ann.params['rerank']}, "
          f"trained on {ann.params['train_size']:,}) | |")  # fmt: skip
    print(f"| generate the gallery (float16 .npy, in 1M chunks) | {generate_s:,.0f} s | |")
    print(f"| build (train on the sample + add in chunks) | {build_s:,.0f} s | |")
    print(f"| index file | {index_bytes / 2**20:,.0f} MiB = {index_bytes / float32_bytes:.3f} of float32 "
          f"({float32_bytes / 2**30:.1f} GiB) | |")  # fmt: skip
    loaded = memory["anon"] + memory["index_file"]
    print(f"| resident memory of the loaded index after {len(queries)} queries (heap + mapped index file) | "
          f"{loaded / 2**20:,.0f} MiB | <= 1 GiB {'met' if loaded <= 2**30 else 'missed'} |")  # fmt: skip
    print(f"| (not counted: pages of the float16 embeddings file re-ranking touched) | "
          f"{memory['embeddings_file'] / 2**20:,.0f} MiB | |")  # fmt: skip
    print(f"| recall@10 after re-ranking, {args.queries} queries | {recall:.3f} | >= 0.95 "
          f"{'met' if recall >= 0.95 else 'missed'} |")  # fmt: skip
    for batch in (1, BATCH):
        ratio = speed[("ivfpq", batch)] / speed[("exact", batch)]
        print(f"| queries/s at batch {batch}: ivfpq vs exact | {speed[('ivfpq', batch)]:,.0f} vs "
              f"{speed[('exact', batch)]:,.1f} = **{ratio:,.0f}x** | >= 50x {'met' if ratio >= 50 else 'missed'} |")
    for rerank, other_recall, single, batched in more:
        print(f"| re-rank {rerank} instead: recall@10, queries/s at batch 1 and {BATCH} | {other_recall:.3f}, "
              f"{single:,.0f} ({single / speed[('exact', 1)]:,.0f}x), {batched:,.0f} ({batched / speed[('exact', BATCH)]:,.0f}x) | |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
