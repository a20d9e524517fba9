"""Projection heads (first- and second-order), L2 normalisation and masked mean."""

import math

import keras
import numpy as np
import pytest

from dual_encoder.models.layers import (
    CellGramHead,
    L2Normalize,
    ProjectionHead,
    SlotGramHead,
    WindowGramHead,
    masked_mean,
    masked_tokens,
    psd_square_root,
)


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


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _upper(gram):
    """The upper triangle of [B, d, d] Gram matrices, off-diagonal entries scaled by sqrt(2)."""
    rows, columns = np.triu_indices(gram.shape[-1])
    return gram[:, rows, columns] * np.where(rows == columns, 1.0, np.sqrt(2.0))


def test_cell_gram_head_is_the_cells_gram_matrix_beside_their_max_pooled_first_order_part():
    head = CellGramHead(embed_dim=6, vector_dim=3, grid=2, num_projection_layers=1)
    features = np.random.default_rng(0).normal(size=(2, 2 * 2 * 5)).astype("float32")
    outputs = np.asarray(head(features))

    places = np.array([[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1]], "float32")  # row, then column
    cells = np.concatenate([features.reshape(2, 4, 5), np.broadcast_to(places, (2, 4, 4))], axis=-1)
    hidden = np.asarray(keras.activations.gelu(cells @ head.hidden[0].kernel.numpy() + head.hidden[0].bias.numpy()))
    vectors = hidden @ head.to_vectors.kernel.numpy() + head.to_vectors.bias.numpy()
    first = (hidden @ head.to_first_order.kernel.numpy() + head.to_first_order.bias.numpy()).max(axis=1)
    expected = np.concatenate([_unit(first), _unit(_upper(np.einsum("bni,bnj->bij", vectors, vectors)))], -1) / np.sqrt(2)
    assert head.output_dim == 6 + 3 * 4 // 2 == outputs.shape[-1]
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(outputs, axis=-1), 1.0, rtol=1e-5)


def test_gram_heads_bind_what_a_sum_of_terms_cannot():
    """One cell holding "red" and "star" against a red cell and a star cell: a first-order score (a max over
    the cells) is the same for both; the second-order score ranks the bound one first."""
    grid, features = 2, 2  # per cell: [red, star]
    image_head = CellGramHead(embed_dim=2, vector_dim=2, grid=grid, num_projection_layers=0)
    text_head = SlotGramHead(embed_dim=2, vector_dim=2, slots=1, num_projection_layers=0)
    image_head.build((None, grid * grid * features))
    text_head.build((None, features))
    image_head.to_vectors.kernel.assign(np.vstack([np.eye(2), np.zeros((2 * grid, 2))]).astype("float32"))
    image_head.to_first_order.kernel.assign(np.vstack([np.eye(2), np.zeros((2 * grid, 2))]).astype("float32"))
    text_head.to_vectors.kernel.assign(np.eye(2, dtype="float32"))
    text_head.to_first_order.kernel.assign(np.eye(2, dtype="float32"))
    bound = np.array([[1, 1, 0, 0, 0, 0, 0, 0]], "float32")  # a red star in the first cell
    apart = np.array([[1, 0, 0, 1, 0, 0, 0, 0]], "float32")  # a red thing in the first cell, a star in the second
    query = np.asarray(text_head(np.array([[1, 1]], "float32")))[0]  # "a red star"
    bound_image, apart_image = (np.asarray(image_head(x))[0] for x in (bound, apart))
    np.testing.assert_allclose(bound_image[:2], apart_image[:2])  # the same first-order half
    assert query @ bound_image == pytest.approx((1 + 1) / 2, abs=1e-5)
    assert query @ apart_image == pytest.approx((1 + 2 / (2 * np.sqrt(2))) / 2, abs=1e-5)


def test_window_gram_head_is_the_gram_matrix_of_token_windows_beside_the_tokens_mean():
    head = WindowGramHead(embed_dim=6, vector_dim=3, sequence_length=4, window=3, num_projection_layers=1)
    tokens = np.random.default_rng(0).normal(size=(2, 4, 5)).astype("float32")
    tokens[0, 3] = tokens[1, 2:] = 0  # padding: 3 and 2 real tokens
    outputs = np.asarray(head(tokens.reshape(2, 20)))

    kernel, bias = head.windows.kernel.numpy(), head.windows.bias.numpy()  # [window, in, out]
    padded = np.pad(tokens, ((0, 0), (1, 1), (0, 0)))
    windows = np.stack([sum(padded[:, i + k] @ kernel[k] for k in range(3)) + bias for i in range(4)], axis=1)
    vectors = np.asarray(keras.activations.gelu(windows)) @ head.to_vectors.kernel.numpy() + head.to_vectors.bias.numpy()
    vectors *= (np.abs(tokens).sum(-1) > 0)[..., None]
    mean = np.stack([tokens[0, :3].mean(0), tokens[1, :2].mean(0)])
    hidden = np.asarray(keras.activations.gelu(mean @ head.hidden[0].kernel.numpy() + head.hidden[0].bias.numpy()))
    first = hidden @ head.to_first_order.kernel.numpy() + head.to_first_order.bias.numpy()
    expected = np.concatenate([_unit(first), _unit(_upper(np.einsum("bni,bnj->bij", vectors, vectors)))], -1) / np.sqrt(2)
    assert head.output_dim == 6 + 3 * 4 // 2 == outputs.shape[-1]
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)


def test_window_gram_head_tells_which_colour_goes_with_which_shape_where_slots_of_a_mean_cannot():
    """ "a red star and a blue circle" against "a red circle and a blue star": the same words, so the same
    mean (and the same slots made from it); windows of two tokens pair each colour with the next word."""
    words = {w: i for i, w in enumerate(["a", "red", "star", "and", "blue", "circle"])}

    def tokens(text, length=8):
        one_hot = np.zeros((1, length, len(words)), "float32")
        for position, word in enumerate(text.split()):
            one_hot[0, position, words[word]] = 1
        return one_hot

    head = WindowGramHead(embed_dim=6, vector_dim=6, sequence_length=8, window=2, num_projection_layers=0)
    head.build((None, 8 * 6))
    kernel = np.zeros((2, 6, 6), "float32")
    kernel[0] = kernel[1] = np.eye(6)  # each window: the sum of its two tokens' one-hots, shifted by one
    head.windows.kernel.assign(kernel * 3)
    head.to_vectors.kernel.assign(np.eye(6, dtype="float32"))
    one, other = (tokens(t) for t in ("a red star and a blue circle", "a red circle and a blue star"))
    np.testing.assert_allclose(masked_mean(one, one.any(-1)), masked_mean(other, other.any(-1)))  # a bag of words
    first, second = (np.asarray(head(t.reshape(1, -1)))[0] for t in (one, other))
    np.testing.assert_allclose(first[:6], second[:6], atol=1e-6)  # the first-order half: from the mean
    assert first @ second < 0.95  # the Gram half differs: (red, star) in one, (red, circle) in the other
    # padding adds nothing: the same text in a longer sequence gives the same embedding
    longer = WindowGramHead(embed_dim=6, vector_dim=6, sequence_length=10, window=2, num_projection_layers=0)
    longer.build((None, 10 * 6))
    longer.set_weights(head.get_weights())
    padded = np.asarray(longer(tokens("a red star and a blue circle", 10).reshape(1, -1)))[0]
    np.testing.assert_allclose(padded, first, atol=1e-6)


def test_psd_square_root_matches_the_eigendecomposition_and_weighs_a_small_object_by_the_root_of_its_cells():
    rng = np.random.default_rng(0)
    a, b = np.linalg.qr(rng.normal(size=(6, 2)))[0].T  # two orthonormal directions: a large and a small object
    gram = 9 * np.outer(a, a) + 4 * np.outer(b, b) + 0.5 * np.eye(6)  # 9 cells and 4 cells
    values, vectors = np.linalg.eigh(gram)
    exact = (vectors * np.sqrt(values)) @ vectors.T
    root = np.asarray(psd_square_root(keras.ops.convert_to_tensor(gram[None].astype("float32")), iterations=8))[0]
    np.testing.assert_allclose(root, exact, atol=2e-3)
    assert a @ root @ a / (b @ root @ b) == pytest.approx(np.sqrt(9.5 / 4.5), rel=1e-2)  # was 9.5 / 4.5 without it


def test_masked_tokens_zero_the_padding_rows_and_flatten_row_by_row():
    sequence = np.arange(12, dtype="float32").reshape(2, 3, 2) + 1
    mask = np.array([[True, True, False], [True, False, False]])
    flat = masked_tokens(keras.ops.convert_to_tensor(sequence), mask)
    np.testing.assert_allclose(flat, [[1, 2, 3, 4, 0, 0], [7, 8, 0, 0, 0, 0]])


def test_gram_heads_output_float32_under_mixed_precision_and_round_trip_their_config(mixed_precision):
    head = SlotGramHead(embed_dim=4, vector_dim=3, slots=2, num_projection_layers=2, dropout=0.1, name="text_projection")
    outputs = head(np.ones((2, 5), "float16"))
    assert outputs.dtype == "float32" and outputs.shape == (2, 4 + 6)
    restored = SlotGramHead.from_config(head.get_config())
    assert (restored.embed_dim, restored.vector_dim, restored.slots, len(restored.hidden), restored.dropout) == (
        4, 3, 2, 2, 0.1,
    )  # fmt: skip
    cells = CellGramHead.from_config(CellGramHead(embed_dim=4, vector_dim=3, grid=3).get_config())
    assert (cells.grid, cells.output_dim) == (3, 10)
    windows = WindowGramHead(embed_dim=4, vector_dim=3, sequence_length=5, window=3, root=True)
    assert windows(np.ones((2, 5 * 7), "float16")).dtype == "float32"
    windows = WindowGramHead.from_config(windows.get_config())
    assert (windows.sequence_length, windows.window, windows.output_dim, windows.root) == (5, 3, 10, True)


def test_l2_normalize_keeps_zero_vectors_finite():
    outputs = L2Normalize()(np.array([[3.0, 4.0], [0.0, 0.0]], "float32"))
    np.testing.assert_allclose(outputs, [[0.6, 0.8], [0.0, 0.0]])


def test_masked_mean_ignores_padding_and_survives_empty_rows():
    sequence = np.array([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]], "float32")
    mask = np.array([[True, True, False], [False, False, False]])
    np.testing.assert_allclose(masked_mean(keras.ops.convert_to_tensor(sequence), mask), [[2.0], [0.0]])
