"""Importing `dual_encoder.serve` in a fresh process pins OpenBLAS to one thread unless told otherwise."""

import os
import subprocess
import sys

import pytest

_PRINT_SETTING = "import dual_encoder.serve, os; print(os.environ['OPENBLAS_NUM_THREADS'])"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("2", "2")])
def test_serve_import_sets_one_blas_thread_by_default(given, expected):
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    output = subprocess.run([sys.executable, "-c", _PRINT_SETTING], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == expected
