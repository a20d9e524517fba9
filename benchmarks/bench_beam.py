"""Gallery embedding on Apache Beam's DirectRunner (2 worker processes) vs the local path, on the same images, in
one run: wall time, images/s, the overhead, and the largest difference between the two indexes' embeddings.

    python benchmarks/bench_beam.py                    # 2,000 synthetic 64x64 images
    python benchmarks/bench_beam.py --num-images 200   # the scale knob

The model is the `synthetic-small` preset, untrained (the cost is the architecture's, not the weights'). Both paths
list, hash, read, decode (EXIF, pixel limit), embed and save an index; Beam also starts its worker processes, each
loading TensorFlow and the model, and writes and merges shards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dual_encoder.config import Config
from dual_encoder.data.synthetic import example_queries, generate_synthetic
from dual_encoder.index import ImageIndex, build_index
from dual_encoder.index.beam import build_index_on_beam
from dual_encoder.models import build_dual_encoder, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    with tempfile.TemporaryDirectory(dir=".") as workdir:
        work = Path(workdir)
        captions = generate_synthetic(work / "synthetic", args.num_images, seed=0)
        images = captions.parent / "images"
        config = Config.from_preset("synthetic-small")
        save_model(build_dual_encoder(config.model, captions=example_queries(500, seed=1)), work / "model")

        started = time.perf_counter()
        local = build_index(work / "model", images, work / "local.ix", config.index, progress=False)
        local_s = time.perf_counter() - started
        started = time.perf_counter()
        on_beam = build_index_on_beam(
            work / "model", images, work / "beam.ix", config.index, runner="direct",
            options=[f"direct_num_workers={args.workers}", "direct_running_mode=multi_processing"],
        )  # fmt: skip
        beam_s = time.perf_counter() - started
        a, b = ImageIndex.load(work / "local.ix"), ImageIndex.load(work / "beam.ix")
        assert [i.path for i in a.items] == [i.path for i in b.items]
        difference = float(np.abs(np.asarray(a.embeddings) - np.asarray(b.embeddings)).max())

    print(f"## Index build: Beam DirectRunner ({args.workers} worker processes) vs local, "
          f"{args.num_images:,} synthetic 64x64 PNGs, `synthetic-small` image tower\n")  # fmt: skip
    print("| path | items | wall s | images/s |")
    print("|---|---:|---:|---:|")
    print(f"| local (`index build`) | {local.count:,} | {local_s:.1f} | {local.count / local_s:,.0f} |")
    print(f"| Beam DirectRunner, {args.workers} workers (`--runner direct`) | {on_beam.count:,} | {beam_s:.1f} | "
          f"{on_beam.count / beam_s:,.0f} |")  # fmt: skip
    print(f"\nBeam / local wall time: {beam_s / local_s:.2f}x (overhead {beam_s - local_s:+.1f} s); "
          f"largest embedding difference {difference:.2e} (same rows, same order)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
