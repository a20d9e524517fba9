"""DualEncoder: the tower contract, batch forms, frozen backbones, config round-trip, precision, tf.data."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.model_config import ApplicationConfig
from dual_encoder.config import ConfigError
from dual_encoder.losses import ClipLoss, SigLipLoss, UnknownLossError, build_loss
from dual_encoder.models import BatchKeysError, DualEncoder, build_dual_encoder
from dual_encoder.models.layers import ModelConfigError, SlotGramHead, WindowGramHead

from .conftest import CAPTIONS


@pytest.fixture
def model(tiny_config):
    return build_dual_encoder(tiny_config, captions=CAPTIONS)


def test_encoders_return_unit_float32_embeddings(model, images):
    image_embeddings = model.encode_image(images)
    text_embeddings = model.encode_text(CAPTIONS[:3])
    for embeddings in (image_embeddings, text_embeddings):
        assert embeddings.shape == (3, 16) and embeddings.dtype == tf.float32
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


def test_encoding_is_backbone_features_then_head(model, images):
    np.testing.assert_allclose(
        model.encode_image(images), model.encode_image_features(model.image_features(images)), rtol=1e-5
    )
    np.testing.assert_allclose(
        model.encode_text(CAPTIONS), model.encode_text_features(model.text_features(CAPTIONS)), rtol=1e-5
    )
    assert model.image_features(images).shape == (3, 16 * 3 * 8)  # small_cnn width 8 at 32x32 -> 4x4x24
    assert model.text_features(CAPTIONS).shape == (4, 32)


def test_token_id_path_equals_string_path(model):
    tokens = model.tokenize(CAPTIONS)
    np.testing.assert_allclose(
        model.encode_token_ids(tokens["token_ids"], tokens["padding_mask"]), model.encode_text(CAPTIONS), rtol=1e-5
    )


def test_call_takes_raw_inputs_or_features(model, images):
    captions = tf.constant(CAPTIONS[:3])
    raw = model({"images": images, "captions": captions})
    features = model({"image_features": model.image_features(images), "text_features": model.text_features(captions)})
    mixed = model({"image_features": model.image_features(images), "captions": captions})
    for outputs in (features, mixed):
        assert set(outputs) == {"image_embeddings", "text_embeddings"}
        for key in outputs:
            np.testing.assert_allclose(outputs[key], raw[key], rtol=1e-5)
    loss = model.compute_contrastive_loss(raw)
    assert loss.shape == () and np.isfinite(float(loss))


def test_several_captions_per_image_run_the_image_tower_once_and_score_every_pair(tiny_config, images):
    # siglip: clip's softmax gives repeated rows the same loss whether or not they are marked as one image.
    model = build_dual_encoder(tiny_config.replace({"loss.name": "siglip"}), captions=CAPTIONS)
    captions = tf.constant([CAPTIONS[:2], CAPTIONS[2:], CAPTIONS[1:3]])  # [3 images, 2 captions]
    image_ids = tf.constant([5, 6, 7], tf.int64)
    calls = []
    original = model.image_encoder.call
    model.image_encoder.call = lambda x, training=False: calls.append(x.shape[0]) or original(x, training=training)
    outputs = model({"images": images, "captions": captions, "image_ids": image_ids})
    model.image_encoder.call = original
    assert calls == [3]  # three images, once each
    np.testing.assert_allclose(outputs["image_embeddings"], np.repeat(model.encode_image(images), 2, axis=0), rtol=1e-5)
    np.testing.assert_allclose(outputs["text_embeddings"], model.encode_text(tf.reshape(captions, [-1])), rtol=1e-5)
    np.testing.assert_array_equal(outputs["image_ids"], [5, 5, 6, 6, 7, 7])
    # Both captions of an image fit both of its rows: not the loss of six unrelated pairs.
    loss = float(model.compute_contrastive_loss(outputs))
    unrelated = float(model.contrastive_loss(outputs["image_embeddings"], outputs["text_embeddings"]))
    assert np.isfinite(loss) and abs(loss - unrelated) > 1e-3
    text_features = tf.reshape(model.text_features(tf.reshape(captions, [-1])), (3, 2, -1))
    features = model({"image_features": model.image_features(images), "text_features": text_features, "image_ids": image_ids})
    np.testing.assert_allclose(features["text_embeddings"], outputs["text_embeddings"], rtol=1e-5)
    assert float(model.compute_contrastive_loss(features)) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize(
    "batch",
    [{"captions": tf.constant(["x"])}, {"images": np.zeros((1, 32, 32, 3)), "image_features": np.zeros((1, 32))}],
)
def test_call_rejects_a_batch_without_exactly_one_input_per_tower(model, batch):
    with pytest.raises(BatchKeysError, match="exactly one of 'images' and 'image_features'"):
        model(batch)


def test_the_config_is_the_model_s(model, tiny_config):
    assert model.model_config == tiny_config
    assert (model.image_size, model.sequence_length, model.embed_dim) == (32, 8, 16)
    assert model.is_trainable("image") and model.is_trainable("text")


def test_frozen_backbones_are_not_trainable(tiny_config):
    config = tiny_config.replace({"image.trainable": False, "text.trainable": False})
    model = build_dual_encoder(config, captions=CAPTIONS)
    assert model.backbones_frozen
    trainable = {id(w) for w in model.trainable_weights}
    heads_and_loss = [model.image_projection, model.text_projection, model.contrastive_loss]
    assert trainable == {id(w) for layer in heads_and_loss for w in layer.trainable_weights}
    assert {id(w) for w in model.contrastive_loss.trainable_weights} <= trainable  # learnable temperature
    assert not build_dual_encoder(tiny_config, captions=CAPTIONS).backbones_frozen


@pytest.mark.parametrize("loss, loss_class", [("clip", ClipLoss), ("siglip", SigLipLoss)])
def test_the_model_owns_its_loss(tiny_config, loss, loss_class):
    model = build_dual_encoder(tiny_config.replace({"loss.name": loss, "loss.gather_negatives": False}), captions=CAPTIONS)
    assert isinstance(model.contrastive_loss, loss_class)
    assert model.contrastive_loss.gather_negatives is False  # passed to its constructor
    assert all(any(w is v for v in model.weights) for w in model.contrastive_loss.weights)


def test_unknown_loss_and_backbone_are_clear_errors(tiny_config):
    with pytest.raises(UnknownLossError):
        build_loss("triplet")
    with pytest.raises(ConfigError, match='model.loss.name="triplet" is not allowed'):
        build_dual_encoder(tiny_config.replace({"loss.name": "triplet"}), captions=CAPTIONS)
    image = dataclasses.replace(ApplicationConfig(), backbone="vit")
    with pytest.raises(ConfigError, match='model.image.backbone="vit" is not allowed'):
        build_dual_encoder(dataclasses.replace(tiny_config, image=image), captions=CAPTIONS)


def test_config_round_trip(model, images):
    config = model.get_config()
    json.dumps(config)  # plain JSON: the model config is data
    restored = DualEncoder.from_config(config)
    assert restored.model_config == model.model_config
    assert restored.vocabulary == model.vocabulary
    restored.set_weights(model.get_weights())
    np.testing.assert_allclose(restored.encode_image(images), model.encode_image(images), rtol=1e-5)
    np.testing.assert_allclose(restored.encode_text(CAPTIONS), model.encode_text(CAPTIONS), rtol=1e-5)


def test_mixed_precision_gives_float32_embeddings_and_loss(tiny_config, images, mixed_precision):
    model = build_dual_encoder(tiny_config, captions=CAPTIONS)
    assert model.image_projection.input_projection.compute_dtype == "float16"
    outputs = model({"images": images, "captions": tf.constant(CAPTIONS[:3])}, training=True)
    assert outputs["image_embeddings"].dtype == tf.float32
    assert outputs["text_embeddings"].dtype == tf.float32
    loss = model.compute_contrastive_loss(outputs)
    assert loss.dtype == tf.float32 and np.isfinite(float(loss))


def test_encoding_inside_tf_data_map_equals_eager(model, images):
    image_dataset = tf.data.Dataset.from_tensor_slices(images).batch(2).map(model.encode_image)
    text_dataset = tf.data.Dataset.from_tensor_slices(CAPTIONS).batch(3).map(model.encode_text)
    np.testing.assert_allclose(np.concatenate(list(image_dataset)), model.encode_image(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(list(text_dataset)), model.encode_text(CAPTIONS), rtol=1e-5, atol=1e-6)


def test_a_gradient_step_reaches_every_trainable_weight(model, images):
    batch = {"images": images, "captions": tf.constant(CAPTIONS[:3])}
    with tf.GradientTape() as tape:
        loss = model.compute_contrastive_loss(model(batch, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    missing = [v.path for v, g in zip(model.trainable_variables, gradients) if g is None]
    assert not missing


def test_builds_under_a_strategy_scope(tiny_config):
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = build_dual_encoder(tiny_config, captions=CAPTIONS)
    assert isinstance(model.contrastive_loss.log_logit_scale.value, tf.Variable)
    assert model.encode_text(CAPTIONS[:1]).shape == (1, 16)
    keras.backend.clear_session()


@pytest.fixture
def second_order_config(tiny_config):
    return tiny_config.replace(
        {"image.backbone": "small_cnn_cells", "heads.kind": "second_order", "heads.vector_dim": 4, "heads.layers": 1}
    )


@pytest.mark.parametrize("pooling, text_head", [("mean", SlotGramHead), ("tokens", WindowGramHead)])
def test_second_order_heads_give_unit_embeddings_that_train_and_survive_a_config_round_trip(
    second_order_config, images, pooling, text_head
):
    root = pooling == "tokens"  # the demo's heads: windows of tokens and the Gram matrix's square root
    second_order_config = second_order_config.replace({"text.pooling": pooling, "heads.gram_root": root})
    model = build_dual_encoder(second_order_config, captions=CAPTIONS)
    assert model.embed_dim == 16 + 4 * 5 // 2 and model.image_projection.grid == 4  # 32 px -> a 4 x 4 map of cells
    assert type(model.text_projection) is text_head and model.image_projection.root == model.text_projection.root == root
    captions = tf.constant(CAPTIONS[:3])
    raw = model({"images": images, "captions": captions}, training=True)
    for key in ("image_embeddings", "text_embeddings"):
        assert raw[key].shape == (3, model.embed_dim) and raw[key].dtype == tf.float32
        np.testing.assert_allclose(np.linalg.norm(raw[key], axis=-1), 1.0, rtol=1e-5)
    features = model({"image_features": model.image_features(images), "text_features": model.text_features(captions)})
    np.testing.assert_allclose(features["image_embeddings"], model.encode_image(images), rtol=1e-5)
    with tf.GradientTape() as tape:
        loss = model.compute_contrastive_loss(model({"images": images, "captions": captions}, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    assert not [v.path for v, g in zip(model.trainable_variables, gradients) if g is None]
    restored = DualEncoder.from_config(json.loads(json.dumps(model.get_config())))
    assert restored.model_config == second_order_config
    restored.set_weights(model.get_weights())
    np.testing.assert_allclose(restored.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(restored.encode_text(CAPTIONS), model.encode_text(CAPTIONS), rtol=1e-5, atol=1e-6)


def test_second_order_heads_need_an_image_backbone_that_keeps_its_cells(second_order_config):
    pooled = second_order_config.replace({"image.backbone": "small_cnn_pooled"})
    with pytest.raises(ModelConfigError, match="image.backbone=small_cnn_cells"):
        build_dual_encoder(pooled, captions=CAPTIONS)
