"""Feature cache: run each locked tower once over a split and keep its outputs next to the data.

Each tower has its own cache (`<data>/features/<split>-<tower>-<key>/`), so a run with both towers locked and a
LiT run (one tower locked, the other trained) share the locked side's features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from dual_encoder.atomic import FEATURE_CACHE, atomic_directory, writer_lock
from dual_encoder.data.pipeline import image_input, make_image_dataset, read_split
from dual_encoder.models.compiled import compiled

TOWERS = ("image", "text")
TEXT_BATCH_FACTOR = 4  # caption batch = 4 x image batch during extraction

# The model settings that shape each tower's backbone outputs (the heads' settings do not).
_TOWER_FIELDS = {
    "image": ("image_backbone", "image_weights", "image_size", "image_width", "pretrained"),
    "text": (
        "text_backbone", "text_preset", "text_preprocessor", "text_pooling", "sequence_length",
        "vocabulary_size", "text_width", "text_layers", "text_heads", "pretrained", "vocabulary",
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Backbone outputs of one split: one row per image, one row per caption (captions grouped by image).

    A side is None when its tower was not cached (it trains, so it runs live).
    """

    num_captions: np.ndarray  # [num_images] captions of each image, in order
    image_features: Optional[np.ndarray] = None  # [num_images, F_image]
    text_features: Optional[np.ndarray] = None  # [num_captions, F_text]

    @property
    def caption_start(self) -> np.ndarray:
        """Row of each image's first caption in `text_features`."""
        return np.concatenate([[0], np.cumsum(self.num_captions)[:-1]]).astype(np.int64)

    @property
    def text_to_image(self) -> np.ndarray:
        """Image index of every caption row."""
        return np.repeat(np.arange(len(self.num_captions)), self.num_captions)


def _probe_inputs(model, tower: str):
    if tower == "image":
        resize = image_input(model)
        probe = np.random.default_rng(0).integers(0, 256, (2, resize.size, resize.size, 3))
        return tf.constant(probe.astype("uint8"), dtype=tf.uint8) if not resize.exact else tf.constant(probe, tf.float32)
    return tf.constant(["a red circle on the left", "two small blue squares"])


def cache_key(model, manifest: bytes, split: str, tower: str) -> str:
    """The one cache-key computation: the dataset manifest, the split, the tower's settings and the tower's
    backbone outputs on a fixed probe input.

    Hashing outputs rather than weight files covers every way a backbone can change (weights, vocabulary,
    preprocessing) without knowing how each tower stores itself; the other tower plays no part, so changing a
    trained tower keeps the locked one's cache.
    """
    outputs = compiled(model, f"{tower}_features")(_probe_inputs(model, tower)).numpy()
    settings = {name: getattr(model, name, None) for name in _TOWER_FIELDS[tower]}
    digest = hashlib.sha256(manifest + split.encode() + tower.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(np.round(outputs, 4).tobytes())
    return digest.hexdigest()[:16]


def cache_dir(model, data_dir: str | Path, split: str, tower: str) -> Path:
    """Where `tower`'s features of `split` are (or will be) cached."""
    data_dir = Path(data_dir)
    key = cache_key(model, (data_dir / "manifest.json").read_bytes(), split, tower)
    return data_dir / "features" / f"{split}-{tower}-{key}"


def load_or_compute_features(
    model,
    data_dir: str | Path,
    split: str,
    *,
    towers: Sequence[str] = TOWERS,
    batch_size: int = 64,
    progress: bool = True,
) -> SplitFeatures:
    """The split's backbone features of `towers`, each from its cache folder or computed once and stored there
    (see `cache_key`: a changed dataset or tower never reuses stale features)."""
    unknown = set(towers) - set(TOWERS)
    if unknown:
        raise ValueError(f"unknown towers {sorted(unknown)}; expected some of {TOWERS}")
    arrays = {
        f"{tower}_features": _load_or_compute(model, data_dir, split, tower, batch_size, progress) for tower in towers
    }
    return SplitFeatures(num_captions=read_split(data_dir, split).num_captions(), **arrays)


def _load_or_compute(model, data_dir, split: str, tower: str, batch_size: int, progress: bool) -> np.ndarray:
    target = cache_dir(model, data_dir, split, tower)
    cached = target / FEATURE_CACHE.marker
    if cached.is_file():  # readers take no lock: the cache is swapped in whole
        return _read_features(cached)
    # A second run on the same dataset waits for the first to finish the cache, then reads it.
    with writer_lock(target):
        if cached.is_file():
            return _read_features(cached)
        features = compute_features(model, data_dir, split, tower, batch_size=batch_size, progress=progress)
        with atomic_directory(target, FEATURE_CACHE, overwrite=True) as staging:
            np.savez(staging / FEATURE_CACHE.marker, features=features)
    return features


def _read_features(path: Path) -> np.ndarray:
    with np.load(path) as arrays:
        return arrays["features"]


def compute_features(
    model, data_dir: str | Path, split: str, tower: str, *, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """Run one tower's backbone over every image (`image`) or every caption (`text`) of a split, in order."""
    if tower == "image":
        images = make_image_dataset(data_dir, split, image_size=image_input(model), batch_size=batch_size)
        step = compiled(model, "image_features")
        rows = [
            step(batch["images"]).numpy()
            for batch in tqdm(images, desc=f"image features ({split})", unit="batch", disable=not progress)
        ]
        return np.concatenate(rows)
    captions = [caption for image_captions in read_split(data_dir, split).captions for caption in image_captions]
    # Captions outnumber images (about 5 to 1 in COCO) and cost far less each: bigger batches keep the
    # text backbone's matmuls large.
    text_batch = TEXT_BATCH_FACTOR * batch_size
    starts = range(0, len(captions), text_batch)
    bar = dict(desc=f"text features ({split})", unit="batch", disable=not progress)
    if not getattr(model.text_encoder, "trims_padding", False):
        step = compiled(model, "text_features")
        return np.concatenate([step(tf.constant(captions[i : i + text_batch])).numpy() for i in tqdm(starts, **bar)])
    # Captions are mostly shorter than `sequence_length`: run them sorted by length, each batch cut to its longest
    # caption, so no batch pays for columns of padding (the features are the same: see `trims_padding`).
    tokens = [model.tokenize(tf.constant(captions[i : i + text_batch])) for i in starts]
    token_ids = np.concatenate([np.asarray(t["token_ids"]) for t in tokens]).astype(np.int32)
    padding_mask = np.concatenate([np.asarray(t["padding_mask"]) for t in tokens]).astype(bool)
    lengths = padding_mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    step = compiled(model, "token_features")
    features = None
    for i in tqdm(starts, **bar):
        rows = order[i : i + text_batch]
        width = max(1, int(lengths[rows].max()))
        out = step({"token_ids": token_ids[rows, :width], "padding_mask": padding_mask[rows, :width]}).numpy()
        if features is None:
            features = np.empty((len(captions), out.shape[1]), np.float32)
        features[rows] = out
    return features
