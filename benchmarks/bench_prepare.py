"""Time the synthetic generator and `prepare` separately: `python benchmarks/bench_prepare.py --num-images 5000`."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dual_encoder.config import DataConfig  # noqa: E402
from dual_encoder.data.prepare import prepare_dataset  # noqa: E402
from dual_encoder.data.synthetic import generate_synthetic  # noqa: E402


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a temp dir, removed).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or Path(scratch)
        captions, generate_seconds = _timed(
            generate_synthetic, root / "shapes", args.num_images, image_size=args.image_size
        )
        prepare_args = ("csv", captions, captions.parent / "images", root / "prepared", DataConfig())
        summary, prepare_seconds = _timed(prepare_dataset, *prepare_args, progress=False)
        _, rerun_seconds = _timed(prepare_dataset, *prepare_args, progress=False)
        size_mb = sum(p.stat().st_size for p in (root / "prepared").iterdir()) / 1e6

    n = args.num_images
    print(f"images: {n} at {args.image_size}x{args.image_size}, {os.cpu_count()} CPU cores")
    print(f"{'step':<22}{'seconds':>10}{'images/s':>12}")
    print(f"{'generate_synthetic':<22}{generate_seconds:>10.2f}{n / generate_seconds:>12.0f}")
    print(f"{'prepare_dataset':<22}{prepare_seconds:>10.2f}{n / prepare_seconds:>12.0f}")
    print(f"{'prepare (no-op rerun)':<22}{rerun_seconds:>10.2f}{'':>12}")
    print(f"{summary.summary_line()}; {size_mb:.1f} MB written")


if __name__ == "__main__":
    main()
