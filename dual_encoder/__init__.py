"""Natural-language image search with a CLIP-style dual encoder (Keras 3 on TensorFlow)."""

import os

# Keras reads its backend once, at import: set it before anything imports Keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dual_encoder.config import Config  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Config", "__version__"]
