"""TensorFlow's start-up logging (oneDNN, CUDA drivers, cuInit, CPU features) kept off the command line's stderr.

TensorFlow 2.21 logs these from C++ through absl before anything has configured absl, so `TF_CPP_MIN_LOG_LEVEL`
alone does not hide them (checked: every level still prints them). So, besides setting the levels, the first
`import tensorflow` (and the device discovery that logs cuInit) runs with file descriptor 2 sent to a temporary
file, which is dropped — or written out after all, should the import fail.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
from typing import Iterator

_QUIET_CPP_LEVEL = "3"  # errors too: the CLI reports real failures itself, as one line


def configure(verbose: bool) -> None:
    """Quiet TensorFlow's logging unless `verbose` (then every level shows). Call before TensorFlow is imported;
    once it is, only the Python loggers can still change."""
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("tensorflow").setLevel(level)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    except ImportError:  # absl-py comes with TensorFlow; without it there is nothing to configure
        pass
    if "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else _QUIET_CPP_LEVEL
    hooks = [finder for finder in sys.meta_path if isinstance(finder, _QuietImport)]
    if verbose:
        for hook in hooks:
            sys.meta_path.remove(hook)
    elif not hooks:
        sys.meta_path.insert(0, _QuietImport())


@contextlib.contextmanager
def stderr_dropped() -> Iterator[None]:
    """Send file descriptor 2 (C++ and Python alike) to a temporary file for the block; replay it if it raises."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            capture.seek(0)
            os.write(2, capture.read())  # why the block failed, as it was said
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once (then leaves `sys.meta_path`) and hands back a loader that runs it quietly."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with stderr_dropped():
            self._loader.exec_module(module)
            module.config.list_physical_devices()  # where cuInit is called and logged, not at import
        module.__loader__ = module.__spec__.loader = self._loader  # the module's own loader from here on
