"""Natural-language image search with a CLIP-style dual encoder (Keras 3 on TensorFlow)."""

import importlib.metadata
import os

# Keras reads its backend once, at import: set it before anything imports Keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dual_encoder.config import Config  # noqa: E402

try:  # one version, setup.cfg's, read from the installed package's metadata
    __version__ = importlib.metadata.version("dual_encoder")
except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"


def load_model(directory):
    """Load a saved model folder, or a training run folder's best model (imports TensorFlow)."""
    from dual_encoder.models import load_model as _load_model

    return _load_model(directory)


__all__ = ["Config", "load_model", "__version__"]
