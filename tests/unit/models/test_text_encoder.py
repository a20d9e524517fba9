"""Text towers: small transformer (from captions), KerasHub BERT (test preset and real MiniLM), TF-Hub."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.config_values import ConfigError
from dual_encoder.model_config import HeadsConfig, KerasHubBertConfig, ModelConfig, SmallTransformerConfig, TFHubConfig
from dual_encoder.models import build_dual_encoder
from dual_encoder.models.layers import ModelConfigError
from dual_encoder.models.text_encoder import (
    KerasHubTextEncoder,
    SmallTransformerTextEncoder,
    TFHubTextEncoder,
    build_text_encoder,
    build_vocabulary,
)

from .conftest import CAPTIONS, HUB_DEFAULT_LENGTH, tiny_image


def _graph_op_types(function, *specs) -> set:
    graph = tf.function(function).get_concrete_function(*specs).graph
    types = {op.type for op in graph.get_operations()}
    for inner in graph._functions.values():  # bodies of nested functions (loops, conditionals)
        types |= {node.op for node in inner.cached_definition.node_def}
    return types


def _assert_core_ops_only(types: set):
    # tf.raw_ops lists exactly the ops built into TensorFlow; TF Text ops are not among them.
    assert types and types <= set(dir(tf.raw_ops)), sorted(types - set(dir(tf.raw_ops)))


TOKEN_SPECS = (tf.TensorSpec([None, 8], tf.int32), tf.TensorSpec([None, 8], tf.bool))


# --- small_transformer ------------------------------------------------------------------------------


def test_vocabulary_is_standardised_ranked_and_capped():
    vocabulary = build_vocabulary(["A red circle!", "a red square", "A blue square."], max_size=5)
    # 5 ids minus padding and OOV; most frequent first, ties in Keras's fixed (reverse lexical) order.
    assert vocabulary == ["a", "square", "red"]
    assert build_vocabulary(["A blue square.", "a red square", "A red circle!"], max_size=5) == vocabulary


def test_vocabulary_needs_captions_with_tokens():
    with pytest.raises(ModelConfigError, match="zero captions"):
        build_vocabulary([], 10)
    with pytest.raises(ModelConfigError, match="no tokens"):
        build_vocabulary(["", "!!"], 10)


def _small_transformer(**kwargs):
    settings = dict(width=32, num_layers=1, num_heads=2, sequence_length=8, pooling="mean")
    return SmallTransformerTextEncoder(build_vocabulary(CAPTIONS, 40), **{**settings, **kwargs})


def test_small_transformer_tokenizes_in_graph_with_core_ops_only():
    tower = _small_transformer()
    tokens = tower.tokenize(tf.constant(["a red circle", "zebra"]))
    assert tokens["token_ids"].dtype == tf.int32 and tokens["token_ids"].shape == (2, 8)
    np.testing.assert_array_equal(tokens["padding_mask"][1], [True] + [False] * 7)  # "zebra" is one OOV token
    _assert_core_ops_only(_graph_op_types(tower.call, tf.TensorSpec([None], tf.string)))


def test_small_transformer_pooling_ignores_padding_and_handles_empty_text():
    tower = _small_transformer(pooling="mean")
    features = np.asarray(tower(tf.constant(["a red circle", "", "a red circle"])))
    assert features.shape == (3, 32)
    assert np.isfinite(features).all()
    np.testing.assert_allclose(features[0], features[2], rtol=1e-5)
    cls_tower = _small_transformer(pooling="cls")
    assert cls_tower(tf.constant(["two small blue squares"])).shape == (1, 32)


def test_small_transformer_keeps_every_token_in_order_with_tokens_pooling():
    tower = _small_transformer(pooling="tokens")
    texts = tf.constant(["a red circle", "a red circle beside a blue square"])
    features = np.asarray(tower(texts))
    assert tower.output_dim == 8 * 32 == features.shape[1] and tower.tokens_kept == 8
    tokens = features.reshape(2, 8, 32)
    np.testing.assert_array_equal(np.abs(tokens).sum(-1) > 0, tower.tokenize(texts)["padding_mask"])  # padding: zeros
    mean = _small_transformer(pooling="mean")
    mean.set_weights(tower.get_weights())
    np.testing.assert_allclose(tokens[0, :3].mean(0), np.asarray(mean(texts))[0], rtol=1e-4, atol=1e-5)
    assert _small_transformer(pooling="mean").tokens_kept is None


def test_small_transformer_without_vocabulary_is_a_clear_error():
    with pytest.raises(ModelConfigError, match="needs a vocabulary"):
        build_text_encoder(SmallTransformerConfig(), vocabulary=None)
    with pytest.raises(ModelConfigError, match="captions"):
        build_dual_encoder(ModelConfig(image=tiny_image()))


def test_unknown_text_backbone_and_pooling_are_clear_errors():
    with pytest.raises(ModelConfigError, match="unknown text backbone 'gpt'"):
        build_text_encoder(dataclasses.replace(SmallTransformerConfig(), backbone="gpt"))
    with pytest.raises(ModelConfigError, match="unknown text_pooling 'max'"):
        _small_transformer(pooling="max")
    with pytest.raises(ConfigError, match=r"model.text.pooling=\"tokens\" is not allowed: expected one of cls, mean"):
        ModelConfig.from_dict({"text": {"backbone": "keras_hub", "preset": "x", "pooling": "tokens"}})


# --- keras_hub --------------------------------------------------------------------------------------


def test_keras_hub_preset_folder_loads_frozen(bert_preset):
    tower = KerasHubTextEncoder(bert_preset, pooling="cls", sequence_length=8, trainable=False)
    features = tower(tf.constant(["a red circle", "blue squares"]))
    assert features.shape == (2, 32)
    assert tower.trainable_weights == [] and len(tower.non_trainable_weights) > 0
    tokens = tower.tokenize(tf.constant(["a red circle"]))
    np.testing.assert_array_equal(tokens["token_ids"][0, :5], [2, 5, 6, 7, 3])  # [CLS] a red circle [SEP]
    # "cls" is BERT's pooled_output, "mean" the masked mean of the sequence: they differ.
    mean_tower = KerasHubTextEncoder(bert_preset, pooling="mean", sequence_length=8)
    assert not np.allclose(mean_tower(tf.constant(["a red circle"])), features[:1])


def test_keras_hub_token_id_path_needs_core_ops_only(bert_preset):
    tower = KerasHubTextEncoder(bert_preset, pooling="mean", sequence_length=8)
    _assert_core_ops_only(_graph_op_types(tower.encode_token_ids, *TOKEN_SPECS))
    tokens = tower.tokenize(tf.constant(["a red circle"]))
    np.testing.assert_allclose(
        tower.encode_token_ids(tokens["token_ids"], tokens["padding_mask"]), tower(tf.constant(["a red circle"]))
    )


def test_missing_keras_hub_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ModelConfigError, match="cannot load KerasHub BERT preset"):
        KerasHubTextEncoder(str(tmp_path / "missing"))
    with pytest.raises(ModelConfigError, match="needs text.preset"):
        build_text_encoder(KerasHubBertConfig())


def test_real_minilm_checkpoint_ranks_paraphrases_closer(minilm_folder):
    config = ModelConfig(
        image=tiny_image(trainable=False),
        text=KerasHubBertConfig(preset=minilm_folder, pooling="mean", trainable=False, sequence_length=16),
        heads=HeadsConfig(embed_dim=16),
    )
    model = build_dual_encoder(config)
    features = tf.math.l2_normalize(model.text_features(["a puppy playing", "a dog running", "a tax spreadsheet"]), -1)
    similarity = np.asarray(features @ tf.transpose(features))
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert model.backbones_frozen
    backbone_ids = {id(w) for w in model.text_encoder.backbone.weights}
    assert not backbone_ids & {id(w) for w in model.trainable_weights}


# --- tf_hub -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preprocessor, length", [("packing", 8), ("plain", HUB_DEFAULT_LENGTH)])
def test_tf_hub_savedmodels_load_and_embed(hub_models, preprocessor, length):
    tower = TFHubTextEncoder(hub_models["encoder"], hub_models[preprocessor], pooling="mean", sequence_length=8)
    tokens = tower.tokenize(tf.constant(["a red circle", "two blue squares"]))
    assert tokens["token_ids"].shape == (2, length)  # packed to sequence_length where the API allows
    features = np.asarray(tower(tf.constant(["a red circle", "two blue squares"])))
    assert features.shape == (2, tower.output_dim) and np.isfinite(features).all()
    cls_tower = TFHubTextEncoder(hub_models["encoder"], hub_models[preprocessor], pooling="cls", sequence_length=8)
    assert not np.allclose(cls_tower(tf.constant(["a red circle"])), features[:1])


def test_tf_hub_encoder_variables_are_the_towers_weights(hub_models):
    tower = TFHubTextEncoder(hub_models["encoder"], hub_models["packing"], trainable=True)
    assert len(tower.trainable_weights) == 3
    texts = tf.constant(["a red circle"])
    with tf.GradientTape() as tape:
        features = tower(texts, training=True)
    gradients = tape.gradient(features, tower.trainable_variables)
    assert all(g is not None for g in gradients)
    before = np.asarray(tower(texts))
    for weight in tower.trainable_weights:  # assigning the Keras weight must change the hub graph's output
        weight.assign(weight * 0.5)
    assert not np.allclose(tower(texts), before)
    frozen = TFHubTextEncoder(hub_models["encoder"], hub_models["packing"], trainable=False)
    assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) == 3


def test_tf_hub_token_id_path_needs_core_ops_only(hub_models):
    tower = TFHubTextEncoder(hub_models["encoder"], hub_models["packing"], sequence_length=8)
    _assert_core_ops_only(_graph_op_types(tower.encode_token_ids, *TOKEN_SPECS))


def test_missing_tf_hub_handle_is_a_clear_error(tmp_path, hub_models):
    with pytest.raises(ModelConfigError, match="cannot load TF-Hub handle"):
        TFHubTextEncoder(str(tmp_path / "missing"), hub_models["packing"])
    with pytest.raises(ModelConfigError, match="needs text.encoder and text.preprocessor"):
        build_text_encoder(TFHubConfig(encoder=hub_models["encoder"]))
