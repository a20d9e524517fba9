"""Embed a whole split (images and all captions) and score retrieval over its full gallery."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dual_encoder.data.pipeline import make_image_dataset, read_split
from dual_encoder.metrics import retrieval_metrics
from dual_encoder.models.compiled import compiled


def embed_split(model, data_dir, split: str, *, batch_size: int = 64, features=None):
    """Return (image_embeddings, text_embeddings, text_to_image) for every image and caption of a split.

    With `features` (a `SplitFeatures` from the feature cache) only the heads run; otherwise the whole
    towers run on decoded images and caption strings.
    """
    if features is not None:
        encode_images, encode_texts = compiled(model, "encode_image_features"), compiled(model, "encode_text_features")
        image_embeddings = _batched(encode_images, features.image_features, batch_size)
        text_embeddings = _batched(encode_texts, features.text_features, batch_size)
        return image_embeddings, text_embeddings, features.text_to_image
    info = read_split(data_dir, split)
    encode_images, encode_texts = compiled(model, "encode_image"), compiled(model, "encode_text")
    images = make_image_dataset(data_dir, split, image_size=model.image_size, batch_size=batch_size)
    image_embeddings = np.concatenate([_as_numpy(encode_images(batch["images"])) for batch in images])
    captions = np.array([c for image_captions in info.captions for c in image_captions], dtype=object)
    text_embeddings = _batched(encode_texts, captions, batch_size)
    text_to_image = np.repeat(np.arange(len(info.captions)), [len(c) for c in info.captions])
    return image_embeddings, text_embeddings, text_to_image


def evaluate_split(model, data_dir, split: str, *, batch_size: int = 64, features=None) -> dict:
    """Retrieval metrics (recall@K both ways, median ranks, top-100 accuracy) over a split's gallery."""
    image_embeddings, text_embeddings, text_to_image = embed_split(
        model, data_dir, split, batch_size=batch_size, features=features
    )
    return retrieval_metrics(image_embeddings, text_embeddings, text_to_image)


def _batched(fn, rows, batch_size: int) -> np.ndarray:
    outputs = [_as_numpy(fn(tf.constant(rows[i : i + batch_size]))) for i in range(0, len(rows), batch_size)]
    return np.concatenate(outputs)


def _as_numpy(tensor) -> np.ndarray:
    return np.asarray(tensor, dtype=np.float32)
