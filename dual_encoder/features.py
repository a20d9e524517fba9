"""Feature cache: run the frozen backbones once over a split and keep their outputs next to the data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from dual_encoder.atomic import FEATURE_CACHE, atomic_directory, writer_lock
from dual_encoder.data.pipeline import make_image_dataset, read_split
from dual_encoder.models.compiled import compiled

TEXT_BATCH_FACTOR = 4  # caption batch = 4 x image batch during extraction


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Backbone outputs of one split: one row per image, one row per caption (captions grouped by image)."""

    image_features: np.ndarray  # [num_images, F_image]
    text_features: np.ndarray  # [num_captions, F_text]
    num_captions: np.ndarray  # [num_images] captions of each image, in order

    @property
    def caption_start(self) -> np.ndarray:
        """Row of each image's first caption in `text_features`."""
        return np.concatenate([[0], np.cumsum(self.num_captions)[:-1]]).astype(np.int64)

    @property
    def text_to_image(self) -> np.ndarray:
        """Image index of every caption row."""
        return np.repeat(np.arange(len(self.num_captions)), self.num_captions)


def backbone_fingerprint(model, towers: Sequence[str] = ("image", "text")) -> str:
    """Hash of the `towers`' own config sections and of their backbones' outputs on a fixed probe input.

    Only the named towers count (each locked tower's section, `ModelConfig.tower(...).tower_settings`): the
    heads, the loss or the other tower never change it. Hashing outputs as well covers what a section does not
    say (weights, vocabulary, preprocessing) without knowing how each tower stores itself.
    """
    size = model.image_size
    probes = {
        "image": np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8"),
        "text": tf.constant(["a red circle on the left", "two small blue squares"]),
    }
    digest = hashlib.sha256()
    for tower in towers:
        settings = model.model_config.tower(tower).tower_settings(tower)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        digest.update(np.round(compiled(model, f"{tower}_features")(probes[tower]).numpy(), 4).tobytes())
    return digest.hexdigest()[:16]


def load_or_compute_features(
    model,
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int = 64,
    progress: bool = True,
    compute: Optional[Callable[..., SplitFeatures]] = None,
) -> SplitFeatures:
    """The split's backbone features, from `<data_dir>/features/<key>/` or computed once and stored there.

    The key hashes the dataset manifest, the split and the backbone fingerprint, so a changed dataset or
    backbone never reuses stale features. `compute` (default `compute_features`, same arguments) computes them
    elsewhere, e.g. `dual_encoder.index.beam.BeamFeatures` on an Apache Beam runner; the files are the same.
    """
    data_dir = Path(data_dir)
    manifest = (data_dir / "manifest.json").read_bytes()
    key = hashlib.sha256(manifest + split.encode() + backbone_fingerprint(model).encode()).hexdigest()[:16]
    cache_dir = data_dir / "features" / f"{split}-{key}"
    cached = cache_dir / FEATURE_CACHE.marker
    if cached.is_file():  # readers take no lock: the cache is swapped in whole
        return _read_features(cached)
    # A second run on the same dataset waits for the first to finish the cache, then reads it.
    with writer_lock(cache_dir):
        if cached.is_file():
            return _read_features(cached)
        features = (compute or compute_features)(model, data_dir, split, batch_size=batch_size, progress=progress)
        with atomic_directory(cache_dir, FEATURE_CACHE, overwrite=True) as staging:
            np.savez(staging / FEATURE_CACHE.marker, **dataclasses.asdict(features))
    return features


def _read_features(path: Path) -> SplitFeatures:
    with np.load(path) as arrays:
        return SplitFeatures(**{name: arrays[name] for name in arrays.files})


def compute_features(model, data_dir: str | Path, split: str, *, batch_size: int = 64, progress: bool = True) -> SplitFeatures:
    """Run both frozen backbones over every image and every caption of a split."""
    info = read_split(data_dir, split)
    images = make_image_dataset(data_dir, split, image_size=model.image_size, batch_size=batch_size)
    image_step, text_step = compiled(model, "image_features"), compiled(model, "text_features")
    image_rows = [
        image_step(batch["images"]).numpy()
        for batch in tqdm(images, desc=f"image features ({split})", unit="batch", disable=not progress)
    ]
    captions = [caption for image_captions in info.captions for caption in image_captions]
    # Captions outnumber images (about 5 to 1 in COCO) and cost far less each: bigger batches keep the
    # text backbone's matmuls large.
    text_batch = TEXT_BATCH_FACTOR * batch_size
    text_rows = [
        text_step(tf.constant(captions[i : i + text_batch])).numpy()
        for i in tqdm(range(0, len(captions), text_batch), desc=f"text features ({split})", unit="batch", disable=not progress)
    ]
    return SplitFeatures(
        image_features=np.concatenate(image_rows),
        text_features=np.concatenate(text_rows),
        num_captions=np.array([len(c) for c in info.captions], dtype=np.int64),
    )
