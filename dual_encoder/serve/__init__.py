"""The HTTP API and the search web page over a loaded `Searcher` (`create_app`, `run_server`)."""

import os

# One OpenBLAS thread for the index's matrix products: idle OpenBLAS workers spin, taking cores from the
# event loop and the text tower. benchmarks/bench_serve.py on 2 cores: no clear difference on an idle
# machine (370 vs 319 and 340 vs 401 requests/s), but 1.5-2x the requests/s of 2 threads whenever other
# processes competed for the cores (312 vs 203, 261 vs 141). OpenBLAS reads this once, when NumPy loads,
# so it only acts if NumPy is not imported yet (as in `dual-encoder serve`); an explicit value wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from dual_encoder.serve.app import create_app, run_server  # noqa: E402

__all__ = ["create_app", "run_server"]
