"""The dual encoder model: towers, projection heads, the DualEncoder and its model directory."""

from dual_encoder.models.dual_encoder import BatchKeysError, DualEncoder, build_dual_encoder
from dual_encoder.models.io import ModelDirectoryError, load_checked_model, load_model, model_fingerprint, save_model
from dual_encoder.models.layers import ModelConfigError

__all__ = [
    "BatchKeysError",
    "DualEncoder",
    "ModelConfigError",
    "ModelDirectoryError",
    "build_dual_encoder",
    "load_checked_model",
    "load_model",
    "model_fingerprint",
    "save_model",
]
