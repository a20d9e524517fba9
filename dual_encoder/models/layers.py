"""Building blocks shared by the towers: the projection head, L2 normalisation and masked pooling."""

from __future__ import annotations

import keras
from keras import ops

from dual_encoder.errors import DualEncoderError

TEXT_POOLINGS = ("cls", "mean")


class ModelConfigError(DualEncoderError, ValueError):
    """A model setting names something that does not exist or cannot be loaded."""


class L2Normalize(keras.layers.Layer):
    """Scales each vector along the last axis to unit length, always in float32.

    Args:
        epsilon: floor of the squared norm, so an all-zero vector stays finite.
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        # Embeddings feed dot-product scores and losses: keep them float32 under mixed precision.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs):
        return ops.normalize(ops.cast(inputs, "float32"), axis=-1, order=2, epsilon=self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


class ProjectionHead(keras.layers.Layer):
    """The Keras recipe's projection head with an L2-normalised, float32 output.

    `dense(embed_dim)`, then `num_projection_layers` x (gelu -> dense -> dropout -> residual add ->
    layer norm), then L2 normalisation.

    Args:
        embed_dim: size of the shared embedding space.
        num_projection_layers: number of residual gelu blocks.
        dropout: dropout rate inside each block.

    Example:
        >>> head = ProjectionHead(embed_dim=8, num_projection_layers=1, dropout=0.0)
        >>> head(keras.ops.ones((2, 16))).shape
        TensorShape([2, 8])
    """

    def __init__(self, embed_dim: int, num_projection_layers: int = 1, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.num_projection_layers = num_projection_layers
        self.dropout = dropout
        self.input_projection = keras.layers.Dense(embed_dim, dtype=self.dtype_policy, name="input_projection")
        self.block_dense = [
            keras.layers.Dense(embed_dim, dtype=self.dtype_policy, name=f"block_{i}_dense")
            for i in range(num_projection_layers)
        ]
        self.block_dropout = [keras.layers.Dropout(dropout, name=f"block_{i}_dropout") for i in range(num_projection_layers)]
        self.block_norm = [
            keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"block_{i}_norm")
            for i in range(num_projection_layers)
        ]
        self.normalize = L2Normalize(name="l2_normalize")

    def build(self, input_shape):
        self.input_projection.build(input_shape)
        projected_shape = (*input_shape[:-1], self.embed_dim)
        for dense, norm in zip(self.block_dense, self.block_norm):
            dense.build(projected_shape)
            norm.build(projected_shape)

    def call(self, features, training=False):
        projected = self.input_projection(features)
        for dense, dropout, norm in zip(self.block_dense, self.block_dropout, self.block_norm):
            update = dropout(dense(keras.activations.gelu(projected, approximate=False)), training=training)
            projected = norm(projected + update)
        return self.normalize(projected)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.embed_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "embed_dim": self.embed_dim,
            "num_projection_layers": self.num_projection_layers,
            "dropout": self.dropout,
        }


def masked_mean(sequence, padding_mask):
    """Mean of `[B, L, D]` token outputs over the real (unpadded) tokens; an all-padding row gives zeros."""
    mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), axis=-1)
    total = ops.sum(sequence * mask, axis=1)
    count = ops.maximum(ops.sum(mask, axis=1), ops.cast(1, sequence.dtype))
    return total / count
