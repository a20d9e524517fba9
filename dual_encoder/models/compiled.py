"""Graph-compiled tower entry points of a model, traced once per model with fixed input signatures.

Batch loops (feature extraction, evaluation, indexing, search) share these so a changing batch size or a
new call site never retraces a backbone.
"""

from __future__ import annotations

import weakref

import tensorflow as tf

from dual_encoder.data.pipeline import image_input

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signatures(model) -> dict:
    images = image_input(model).spec()
    texts = tf.TensorSpec([None], tf.string, name="texts")
    return {
        "encode_image": images,
        "encode_text": texts,
        "image_features": images,
        "text_features": texts,
        "token_features": {
            "token_ids": tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            "padding_mask": tf.TensorSpec([None, None], tf.bool, name="padding_mask"),
        },
        "encode_image_features": tf.TensorSpec([None, model.image_encoder.output_dim], tf.float32, name="features"),
        "encode_text_features": tf.TensorSpec([None, model.text_encoder.output_dim], tf.float32, name="features"),
    }


def compiled(model, name: str):
    """`model.<name>` as a `tf.function` returning float32, e.g. `compiled(model, "encode_text")(texts)`."""
    functions = _CACHE.setdefault(model, {})
    if name not in functions:
        method = getattr(model, name)
        spec = _signatures(model)[name]
        functions[name] = tf.function(lambda x: tf.cast(method(x), tf.float32), input_signature=[spec])
    return functions[name]
