"""The HTTP API and the search web page over a loaded `Searcher` (`create_app`, `run_server`)."""

import os

# One OpenBLAS thread for the index's matrix products: idle OpenBLAS workers spin, taking the cores from the
# event loop and the text tower (benchmarks/bench_serve.py: 1 thread served ~1.8x the requests/s of 2 on
# 2 cores). OpenBLAS reads this once, when NumPy loads, so it only acts if NumPy is not imported yet (as in
# `dual-encoder serve`); an explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dual_encoder.serve.app import create_app, run_server  # noqa: E402

__all__ = ["create_app", "run_server"]
