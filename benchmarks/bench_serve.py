"""HTTP search load test, side by side in one run: the real server with and without micro-batching, and
with one or all-core BLAS.

    python benchmarks/bench_serve.py                     # 2,000 requests at concurrency 32, 100k items
    python benchmarks/bench_serve.py --requests 500 --items 10000
    python benchmarks/bench_serve.py --model clip-b32 --requests 500   # a CLIP-B/32-sized text tower vs its ceiling

For each mode a fresh `run_server` process serves an untrained synthetic-small-sized model (speed does
not depend on training) over an exact index of random unit vectors; this process is the load generator
(httpx async clients, one per simulated user), so the server keeps its cores. Prints a markdown table.

`--model clip-b32` serves a zero-shot CLIP ViT-B/32-sized pair (random weights, `b32_preset.py`) in the default mode
only, and beside it the ceiling: the bare text tower (`get_text_embeddings` on token ids tokenised beforehand) in
batches of 32 in a fresh process of its own, texts/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # httpcore tries `import sniffio` on every request when it is absent: make that failure instant
    import sniffio  # noqa: F401
except ImportError:
    sys.modules["sniffio"] = None

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from dual_encoder.config import Config, IndexConfig  # noqa: E402
from dual_encoder.data.synthetic import caption_scene, sample_scene  # noqa: E402
from dual_encoder.index.items import ImageRecord  # noqa: E402
from dual_encoder.index.store import ImageIndex, ModelRecord  # noqa: E402
from dual_encoder.models import build_dual_encoder, model_fingerprint, save_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Mode:
    """One server set-up to measure.

    Args:
        label: the table row.
        max_batch: `run_server(max_batch=...)`; 1 = no merging, one query per text-tower call and matmul.
        blas_threads: `OPENBLAS_NUM_THREADS` for the server process (`dual_encoder.serve` defaults it to 1).
    """

    label: str
    max_batch: int
    blas_threads: int


CORES = os.cpu_count() or 1
MODES = (
    Mode("micro-batching (up to 32), 1 BLAS thread (the default)", 32, 1),
    Mode(f"micro-batching (up to 32), {CORES} BLAS threads", 32, CORES),
    Mode("one query per search, 1 BLAS thread", 1, 1),
)
K = 10
WARMUP_REQUESTS = 64
STARTUP_SECONDS = 180


def make_queries(count: int, seed: int = 0) -> list[str]:
    """Distinct captions of the synthetic dataset: realistic lengths, no two requests alike."""
    rng = np.random.default_rng(seed)
    return [caption_scene(sample_scene(rng), rng, 1)[0] for _ in range(count)]


def build_model_and_index(root: Path, items: int, queries: list[str], model_name: str = "synthetic-small") -> Path:
    if model_name == "clip-b32":
        from b32_preset import make_b32_preset

        from dual_encoder.model_config import HeadsConfig, ModelConfig, PairedConfig
        from dual_encoder.models.pretrained import create_pretrained_model

        preset = make_b32_preset(root / "clip-b32")
        model_config = ModelConfig(paired=PairedConfig(preset=str(preset)), heads=HeadsConfig(kind="none"))
        model_dir = create_pretrained_model(model_config, root / "model")
        dim = 512
    else:
        model_config = Config.from_preset(model_name).model
        model_dir = save_model(build_dual_encoder(model_config, captions=queries), root / "model")
        dim = model_config.heads.embed_dim
    vectors = np.random.default_rng(1).standard_normal((items, dim), dtype=np.float32)
    records = [
        ImageRecord(path=f"/gallery/{i:07d}.jpg", sha256=hashlib.sha256(str(i).encode()).hexdigest())
        for i in range(items)
    ]
    model = ModelRecord(str(model_dir.absolute()), model_fingerprint(model_dir))
    return ImageIndex.create(vectors, records, IndexConfig(kind="exact"), model).save(root / "index")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(index_dir: Path, port: int, mode: Mode, log: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        f"""
        from dual_encoder.serve import run_server
        run_server({str(index_dir)!r}, host="127.0.0.1", port={port}, max_batch={mode.max_batch})
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(mode.blas_threads)}
    # A file, not a pipe: a server logging faster than anyone reads a pipe would block on it.
    with open(log, "wb") as stream:
        return subprocess.Popen([sys.executable, "-c", code], stdout=stream, stderr=subprocess.STDOUT, env=env)


def wait_until_healthy(base_url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {STARTUP_SECONDS} s")


async def run_load(base_url: str, queries: list[str], concurrency: int, timeout: float = 30) -> tuple[list[float], int, float]:
    """Send every query once with `concurrency` requests in flight; returns (latencies, errors, seconds).

    Each simulated user has its own client and connection, as browsers do: one shared httpx pool with 32
    connections spends more CPU assigning requests to connections than the server spends answering them.
    """
    latencies: list[float] = []
    errors = 0
    pending = iter(queries)

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for query in pending:  # the iterator is shared: each query goes to exactly one user
            started = time.perf_counter()
            try:
                response = await client.get("/api/search", params={"q": query, "k": K})
                ok = response.status_code == 200 and len(response.json()["hits"]) == K
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    # Made before the clock starts: each client loads the CA bundle (~20 ms) even for plain http.
    clients = [httpx.AsyncClient(base_url=base_url, timeout=timeout) for _ in range(concurrency)]
    try:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for client in clients))
        return latencies, errors, time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


def measure(index_dir: Path, mode: Mode, queries: list[str], concurrency: int, timeout: float = 30) -> dict:
    port = free_port()
    log = index_dir.parent / f"server-{port}.log"
    process = start_server(index_dir, port, mode, log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, log)
        asyncio.run(run_load(base_url, queries[:WARMUP_REQUESTS], concurrency, timeout))  # trace the graph, warm caches
        latencies, errors, seconds = asyncio.run(run_load(base_url, queries[WARMUP_REQUESTS:], concurrency, timeout))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # requests still queued in its threads: do not wait for them
            process.kill()
            process.wait()
    milliseconds = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / seconds,
        "p50": float(np.percentile(milliseconds, 50)),
        "p99": float(np.percentile(milliseconds, 99)),
        "max": float(milliseconds.max()),
    }


CEILING = """
import json, sys, time
import tensorflow as tf
from dual_encoder.models import load_model
model = load_model(sys.argv[1])
queries, batch = json.loads(sys.argv[2]), int(sys.argv[3])
backbone = model.text_encoder.paired.backbone
ids = [model.tokenize(queries[i : i + batch])["token_ids"] for i in range(0, len(queries) - batch + 1, batch)]
step = tf.function(backbone.get_text_embeddings, input_signature=[tf.TensorSpec([batch, None], tf.int32)])
step(ids[0])
started = time.perf_counter()
for token_ids in ids:
    step(token_ids).numpy()
print(json.dumps({"texts_per_second": len(ids) * batch / (time.perf_counter() - started)}))
"""


def text_tower_ceiling(model_dir: Path, queries: list[str], batch: int) -> float:
    """Texts/s of the bare text tower on pre-tokenised batches of `batch`, in a fresh process (the cores alone)."""
    run = subprocess.run([sys.executable, "-c", CEILING, str(model_dir), json.dumps(queries), str(batch)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])["texts_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--items", type=int, default=100_000, help="Index size (random unit vectors).")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a temp dir, removed).")
    parser.add_argument("--timeout", type=float, default=30, help="Seconds a request may take before it counts as an error.")
    parser.add_argument("--model", choices=["synthetic-small", "clip-b32"], default="synthetic-small")
    args = parser.parse_args()

    queries = make_queries(WARMUP_REQUESTS + args.requests)
    # Other processes on the machine take cores from the server: say how busy it was.
    load_before = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or Path(scratch)
        index_dir = build_model_and_index(root, args.items, queries, args.model)
        # This process imported TensorFlow to build the model: keep full collections of those objects out
        # of the measured latencies, as the server does.
        gc.collect()
        gc.freeze()
        results = {}
        for mode in MODES if args.model == "synthetic-small" else MODES[:1]:
            results[mode.label] = measure(index_dir, mode, queries, args.concurrency, args.timeout)
            print(f"{mode.label}: {results[mode.label]}", file=sys.stderr, flush=True)
        ceiling = None
        if args.model == "clip-b32":
            ceiling = text_tower_ceiling(index_dir.parent / "model", queries[WARMUP_REQUESTS:], MODES[0].max_batch)

    print(
        f"\n{args.requests} GET /api/search (k={K}) at concurrency {args.concurrency}, {args.items:,}-item exact "
        f"index, model {args.model}, {CORES} CPU cores, "
        f"load generator in its own process, load average before the run {load_before}\n"
    )
    print("| mode | requests | errors | requests/s | p50 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(
            f"| {label} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
            f"| {r['max']:.1f} |"
        )

    if ceiling is not None:
        served = next(iter(results.values()))["rps"]
        print("\n| CLIP-B/32-sized text tower | texts/s | of the ceiling |\n| --- | ---: | ---: |")
        print(f"| `serve`, requests/s at concurrency {args.concurrency} | {served:.1f} | **{served / ceiling:.0%}** |")
        print(f"| bare text tower, pre-tokenised batches of {MODES[0].max_batch} (the ceiling) | {ceiling:.1f} | 100% |")


if __name__ == "__main__":
    main()
