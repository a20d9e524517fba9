"""Projection head, L2 normalisation and masked mean."""

import math

import keras
import numpy as np

from dual_encoder.models.layers import L2Normalize, ProjectionHead, masked_mean


def _recipe_head(features, head):
    """The Keras recipe's projection, in NumPy, with the head's own weights."""
    erf = np.vectorize(math.erf)
    gelu = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))  # noqa: E731  (exact gelu, as tf.nn.gelu)
    projected = features @ head.input_projection.kernel.numpy() + head.input_projection.bias.numpy()
    for dense, norm in zip(head.block_dense, head.block_norm):
        x = projected + gelu(projected) @ dense.kernel.numpy() + dense.bias.numpy()
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        projected = (x - mean) / np.sqrt(var + norm.epsilon) * norm.gamma.numpy() + norm.beta.numpy()
    return projected / np.linalg.norm(projected, axis=-1, keepdims=True)


def test_projection_head_is_the_recipe_then_l2_normalised():
    head = ProjectionHead(embed_dim=8, num_projection_layers=2, dropout=0.5)
    features = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    outputs = head(features)  # training=False: dropout off
    np.testing.assert_allclose(outputs, _recipe_head(features, head), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=-1), 1.0, rtol=1e-5)
    assert len(head.block_dense) == 2


def test_projection_head_dropout_only_in_training():
    head = ProjectionHead(embed_dim=8, num_projection_layers=1, dropout=0.5)
    features = np.ones((4, 5), "float32")
    assert not np.allclose(head(features, training=True), head(features, training=False))


def test_projection_head_outputs_float32_under_mixed_precision(mixed_precision):
    head = ProjectionHead(embed_dim=8)
    assert head.input_projection.compute_dtype == "float16"
    outputs = head(np.ones((2, 5), "float16"))
    assert outputs.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=-1), 1.0, rtol=1e-3)


def test_projection_head_config_round_trip():
    head = ProjectionHead(embed_dim=8, num_projection_layers=2, dropout=0.2, name="image_projection")
    restored = ProjectionHead.from_config(head.get_config())
    assert (restored.embed_dim, restored.num_projection_layers, restored.dropout, restored.name) == (
        8, 2, 0.2, "image_projection",
    )  # fmt: skip


def test_l2_normalize_keeps_zero_vectors_finite():
    outputs = L2Normalize()(np.array([[3.0, 4.0], [0.0, 0.0]], "float32"))
    np.testing.assert_allclose(outputs, [[0.6, 0.8], [0.0, 0.0]])


def test_masked_mean_ignores_padding_and_survives_empty_rows():
    sequence = np.array([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]], "float32")
    mask = np.array([[True, True, False], [False, False, False]])
    np.testing.assert_allclose(masked_mean(keras.ops.convert_to_tensor(sequence), mask), [[2.0], [0.0]])
