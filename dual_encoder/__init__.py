"""Natural-language image search with a CLIP-style dual encoder (Keras 3 on TensorFlow)."""

import os

# Keras reads its backend once, at import: set it before anything imports Keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dual_encoder.config import Config  # noqa: E402

__version__ = "0.1.0"


def load_model(directory):
    """Load a saved model folder, or a training run folder's best model (imports TensorFlow)."""
    from dual_encoder.models import load_model as _load_model

    return _load_model(directory)


__all__ = ["Config", "load_model", "__version__"]
