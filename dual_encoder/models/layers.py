"""Building blocks shared by the towers: the projection and second-order heads, L2 normalisation and masked pooling."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from dual_encoder.errors import DualEncoderError

TEXT_POOLINGS = ("cls", "mean", "tokens")


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


class GramHead(keras.layers.Layer):
    """Base of the second-order heads (`heads.kind: second_order`): a tower's features -> several vectors of
    `vector_dim` (an image's cells; a text's windows of tokens or slots) -> the upper triangle of their Gram
    matrix, sum_n v_n v_n^T, L2-normalised; beside it a first-order part of `embed_dim`, L2-normalised; the two
    halves joined and scaled by 1/sqrt(2), so the embedding has unit length.

    Why: the dot product of two such embeddings is (first-order cosine + sum_k sum_n <t_k, c_n>^2 / norms) / 2.
    The square makes the score of a cell that has both "red" and "star" larger than a red cell's plus a star
    cell's: "a red star" then ranks a red star above a red circle beside a blue star, which no score that is
    a sum of a colour term and a shape term can (BENCHMARKS.md, "Why nothing binds"). The first-order half keeps
    what a sum does well — an image that holds every object a long caption names. Off-diagonal entries are
    scaled by sqrt(2) so the flat dot product equals the Frobenius product of the Gram matrices; the index,
    the export and every search use the embedding as any other. Its length is `output_dim`.

    Args:
        embed_dim: size of the first-order part, and width of the hidden gelu layers.
        vector_dim: size of each vector of the Gram matrix; it adds `vector_dim * (vector_dim + 1) / 2`.
        num_projection_layers: gelu layers before the vectors (applied to each cell of an image).
        dropout: dropout rate after each gelu layer.
        root: use the Gram matrix's square root (`psd_square_root`): an object's weight in an image then grows
            with the square root of the cells it covers, not their number, so a small object beside a large one
            is not outweighed by it ("a small red star" against {large red star, large blue circle}).
    """

    def __init__(
        self, embed_dim: int, vector_dim: int, num_projection_layers: int = 1, dropout: float = 0.0, root: bool = False,
        **kwargs,
    ):
        # The dense layers follow the global policy (bfloat16 / float16 under mixed precision); the Gram matrix —
        # squares summed over many cells — and the normalisation run in float32.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.vector_dim = vector_dim
        self.num_projection_layers = num_projection_layers
        self.dropout = dropout
        self.root = root
        self.hidden = [
            keras.layers.Dense(embed_dim, activation="gelu", name=f"hidden_{i}") for i in range(num_projection_layers)
        ]
        self.hidden_dropout = [keras.layers.Dropout(dropout, name=f"dropout_{i}") for i in range(num_projection_layers)]
        self.to_vectors = keras.layers.Dense(vector_dim * self.vectors_per_input, name="vectors")
        self.to_first_order = keras.layers.Dense(embed_dim, name="first_order")
        self.normalize = L2Normalize(name="l2_normalize")
        row, column = np.triu_indices(vector_dim)
        self._upper = (row * vector_dim + column).astype("int32")
        self._upper_scale = np.where(row == column, 1.0, math.sqrt(2.0)).astype("float32")

    vectors_per_input = 1

    @property
    def output_dim(self) -> int:
        return self.embed_dim + self.vector_dim * (self.vector_dim + 1) // 2

    def _inputs(self, features):
        """Features -> what the hidden layers see."""
        return ops.cast(features, "float32")

    def _vectors_and_first_order(self, inputs, training=False):
        """`_inputs`' output -> the Gram matrix's vectors [B, n, vector_dim] and the first-order part [B, embed_dim]."""
        raise NotImplementedError

    def _hidden(self, x, training=False):
        for dense, dropout in zip(self.hidden, self.hidden_dropout):
            x = dropout(dense(x), training=training)
        return x

    def _input_dim(self, input_shape) -> int:
        return int(input_shape[-1])

    def build(self, input_shape):
        width = self._input_dim(input_shape)
        for dense in self.hidden:
            dense.build((None, width))
            width = self.embed_dim
        self.to_first_order.build((None, width))
        self.to_vectors.build((None, self._build_vector_inputs(input_shape, width)))

    def _build_vector_inputs(self, input_shape, hidden_width: int) -> int:
        """Build what feeds `to_vectors` (by default the hidden layers' output) and return its width."""
        return hidden_width

    def call(self, features, training=False):
        parts = self._vectors_and_first_order(self._inputs(features), training=training)
        vectors, first_order = (ops.cast(x, "float32") for x in parts)
        gram = ops.einsum("bni,bnj->bij", vectors, vectors)
        if self.root:
            gram = psd_square_root(gram)
        upper = ops.take(ops.reshape(gram, (-1, self.vector_dim**2)), self._upper, axis=1) * self._upper_scale
        halves = (self.normalize(first_order), self.normalize(upper))
        return ops.concatenate(halves, axis=-1) / math.sqrt(2.0)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "embed_dim": self.embed_dim,
            "vector_dim": self.vector_dim,
            "num_projection_layers": self.num_projection_layers,
            "dropout": self.dropout,
            "root": self.root,
        }


def psd_square_root(matrices, iterations: int = 5):
    """The square root of symmetric positive semi-definite matrices [B, d, d] by coupled Newton-Schulz iterations
    on each matrix scaled to unit Frobenius norm, scaled back after (iSQRT-COV: Li et al., CVPR 2018): only
    matrix products, so it is fast and differentiable; a few iterations are close for the large eigenvalues, which
    are the ones that matter here."""
    eye = ops.eye(matrices.shape[-1], dtype=matrices.dtype)[None]
    norm = ops.sqrt(ops.sum(matrices * matrices, axis=(1, 2), keepdims=True)) + 1e-12
    y, z = matrices / norm, ops.broadcast_to(eye, ops.shape(matrices))
    for _ in range(iterations):
        step = 0.5 * (3.0 * eye - ops.matmul(z, y))
        y, z = ops.matmul(y, step), ops.matmul(step, z)
    return y * ops.sqrt(norm)


class CellGramHead(GramHead):
    """The image side of `GramHead`: features that are a flattened `grid` x `grid` map of cells (row by row, as
    `small_cnn_cells` gives) -> one vector per cell, from the cell's features and its row and column (one-hot,
    so "on the left" can be part of what a cell says); the first-order part is the max over the cells of their
    own (what is anywhere: "a star and a ring" asks for both, wherever they are).

    Example:
        >>> head = CellGramHead(embed_dim=8, vector_dim=4, grid=2)
        >>> head(keras.ops.ones((3, 2 * 2 * 5))).shape
        TensorShape([3, 18])
    """

    def __init__(self, embed_dim: int, vector_dim: int, grid: int, **kwargs):
        self.grid = grid
        super().__init__(embed_dim, vector_dim, **kwargs)
        rows = np.repeat(np.eye(grid, dtype="float32"), grid, axis=0)
        columns = np.tile(np.eye(grid, dtype="float32"), (grid, 1))
        self._places = np.concatenate([rows, columns], axis=1)[None]  # [1, cells, 2 * grid]

    def _input_dim(self, input_shape) -> int:
        return int(input_shape[-1]) // self.grid**2 + 2 * self.grid

    def _inputs(self, features):
        cells = ops.reshape(ops.cast(features, "float32"), (-1, self.grid**2, ops.shape(features)[-1] // self.grid**2))
        places = ops.broadcast_to(self._places, (ops.shape(cells)[0], *self._places.shape[1:]))
        return ops.concatenate([cells, places], axis=-1)

    def _vectors_and_first_order(self, inputs, training=False):
        hidden = self._hidden(inputs, training)
        return self.to_vectors(hidden), ops.max(self.to_first_order(hidden), axis=1)

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}


class SlotGramHead(GramHead):
    """The text side of `GramHead`: pooled text features -> `slots` vectors (room for as many objects a query
    names) and the first-order part.

    Example:
        >>> head = SlotGramHead(embed_dim=8, vector_dim=4, slots=2)
        >>> head(keras.ops.ones((3, 16))).shape
        TensorShape([3, 18])
    """

    def __init__(self, embed_dim: int, vector_dim: int, slots: int, **kwargs):
        self.slots = slots
        super().__init__(embed_dim, vector_dim, **kwargs)

    @property
    def vectors_per_input(self) -> int:
        return self.slots

    def _vectors_and_first_order(self, inputs, training=False):
        hidden = self._hidden(inputs, training)
        return ops.reshape(self.to_vectors(hidden), (-1, self.slots, self.vector_dim)), self.to_first_order(hidden)

    def get_config(self):
        return {**super().get_config(), "slots": self.slots}


class WindowGramHead(GramHead):
    """The text side of `GramHead` for a tower that keeps its tokens (`pooling: tokens`, `masked_tokens`): one
    vector per token from a window of `window` token outputs around it (a gelu convolution as wide as the
    tokens), padding left out; the first-order part from the tokens' masked mean.

    Why windows: in "a red star and a blue circle" the window around "star" holds "red star and", so the Gram
    matrix pairs red with star and blue with circle — "a red circle and a blue star" gets another one. Slots made
    from a pooled vector (`SlotGramHead`) see the same bag of words for both and cannot tell them apart (their
    cosine was 0.996–0.999 in every run; BENCHMARKS.md, "Binding in the query").

    Example:
        >>> head = WindowGramHead(embed_dim=8, vector_dim=4, sequence_length=5, window=3)
        >>> head(keras.ops.ones((3, 5 * 16))).shape
        TensorShape([3, 18])
    """

    def __init__(self, embed_dim: int, vector_dim: int, sequence_length: int, window: int = 5, **kwargs):
        self.sequence_length = sequence_length
        self.window = window
        super().__init__(embed_dim, vector_dim, **kwargs)
        self.windows = None  # a Conv1D as wide as the tokens, made in `build`

    def _input_dim(self, input_shape) -> int:
        return int(input_shape[-1]) // self.sequence_length

    def _build_vector_inputs(self, input_shape, hidden_width: int) -> int:
        width = self._input_dim(input_shape)
        self.windows = keras.layers.Conv1D(width, self.window, padding="same", activation="gelu", name="windows")
        self.windows.build((None, self.sequence_length, width))
        return width

    def _inputs(self, features):
        width = ops.shape(features)[-1] // self.sequence_length
        return ops.reshape(ops.cast(features, "float32"), (-1, self.sequence_length, width))

    def _vectors_and_first_order(self, tokens, training=False):
        present = ops.any(ops.not_equal(tokens, 0), axis=-1)  # padding rows are all zeros
        first_order = self.to_first_order(self._hidden(masked_mean(tokens, present), training))
        vectors = ops.cast(self.to_vectors(self.windows(tokens)), "float32")
        return vectors * ops.expand_dims(ops.cast(present, "float32"), -1), first_order

    def get_config(self):
        return {**super().get_config(), "sequence_length": self.sequence_length, "window": self.window}


def masked_tokens(sequence, padding_mask):
    """`[B, L, D]` token outputs -> `[B, L * D]`, row by row, each padding token's row all zeros (what a
    `WindowGramHead` reads; a real token's output is never all zeros)."""
    mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), axis=-1)
    return ops.reshape(sequence * mask, (-1, sequence.shape[1] * sequence.shape[2]))


def masked_mean(sequence, padding_mask):
    """Mean of `[B, L, D]` token outputs over the real (unpadded) tokens; an all-padding row gives zeros."""
    mask = ops.expand_dims(ops.cast(padding_mask, sequence.dtype), axis=-1)
    total = ops.sum(sequence * mask, axis=1)
    count = ops.maximum(ops.sum(mask, axis=1), ops.cast(1, sequence.dtype))
    return total / count
