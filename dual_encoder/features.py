"""Feature cache: run each locked tower once over a split and keep its outputs next to the data.

Each tower has its own cache (`<data>/features/<split>-<tower>-<key>/`), so a run with both towers locked and a
LiT run (one tower locked, the other trained) share the locked side's features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from dual_encoder.atomic import FEATURE_CACHE, atomic_directory, writer_lock
from dual_encoder.data.pipeline import image_input, make_image_dataset, read_split
from dual_encoder.models.compiled import compiled

TOWERS = ("image", "text")
TEXT_BATCH_FACTOR = 4  # caption batch = 4 x image batch during extraction


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
        return tf.constant(probe.astype(resize.dtype.as_numpy_dtype), dtype=resize.dtype)
    return tf.constant(["a red circle on the left", "two small blue squares"])


def backbone_fingerprint(model, towers: Sequence[str] = TOWERS) -> str:
    """Hash of the `towers`' own config sections and of their backbones' outputs on a fixed probe input.

    Only the named towers count (each locked tower's section, `ModelConfig.tower(...).tower_settings`): the
    heads, the loss or the other tower never change it. Hashing outputs as well covers what a section does not
    say (weights, vocabulary, preprocessing) without knowing how each tower stores itself.
    """
    digest = hashlib.sha256()
    for tower in towers:
        settings = model.model_config.tower(tower).tower_settings(tower)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        outputs = compiled(model, f"{tower}_features")(_probe_inputs(model, tower)).numpy()
        digest.update(np.round(outputs, 4).tobytes())
    return digest.hexdigest()[:16]


def cache_key(model, manifest: bytes, split: str, tower: str) -> str:
    """`tower`'s cache key: the dataset manifest, the split and that tower's `backbone_fingerprint` (the other
    tower plays no part, so changing a trained tower keeps the locked one's cache)."""
    digest = hashlib.sha256(manifest + split.encode() + tower.encode())
    digest.update(backbone_fingerprint(model, (tower,)).encode())
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
    caption_rows: Optional[np.ndarray] = None,
    batch_size: int = 64,
    progress: bool = True,
    compute: Optional[Callable[..., SplitFeatures]] = None,
) -> SplitFeatures:
    """The split's backbone features of `towers`, each from its cache folder or computed once and stored there
    (see `cache_key`: a changed dataset or tower never reuses stale features).

    `caption_rows` are the caption rows the caller will read (default: all). A text cache may then hold only
    some rows — the others NaN — and a later call that needs more embeds just those and fills them in: a 5-epoch
    run on 8 captions per image embeds the 5 it samples (`pipeline.sampled_caption_rows`), not all 8.

    What is not cached yet is computed together by `compute` (default `compute_features`, same arguments and
    the missing `caption_rows`), e.g. `dual_encoder.index.beam.BeamFeatures` on an Apache Beam runner, which
    fills whole caches; the files are the same.
    """
    unknown = set(towers) - set(TOWERS)
    if isinstance(towers, str) or unknown:
        raise ValueError(f"unknown towers {towers!r}; expected some of {TOWERS}")
    towers = tuple(tower for tower in TOWERS if tower in towers)  # one lock order for every writer
    targets = {tower: cache_dir(model, data_dir, split, tower) for tower in towers}
    arrays = _read_cached(targets)  # readers take no lock: each cache is swapped in whole
    if _lacking(arrays, towers, caption_rows):
        # A second run on the same dataset waits for the first to finish the caches, then reads them.
        with contextlib.ExitStack() as locks:
            for tower in _lacking(arrays, towers, caption_rows):
                locks.enter_context(writer_lock(targets[tower]))
            arrays.update(_read_cached({tower: targets[tower] for tower in _lacking(arrays, towers, caption_rows)}))
            lacking = _lacking(arrays, towers, caption_rows)
            if lacking:
                rows = lacking.get("text")
                if compute is None:
                    computed = compute_features(
                        model, data_dir, split, tuple(lacking), caption_rows=rows, batch_size=batch_size,
                        progress=progress,
                    )  # fmt: skip
                else:
                    computed = compute(model, data_dir, split, tuple(lacking), batch_size=batch_size, progress=progress)
                for tower in lacking:
                    new = getattr(computed, f"{tower}_features")
                    old = arrays.get(tower)
                    arrays[tower] = new if old is None else np.where(np.isnan(new[:, :1]), old, new)
                    with atomic_directory(targets[tower], FEATURE_CACHE, overwrite=True) as staging:
                        np.savez(staging / FEATURE_CACHE.marker, features=arrays[tower])
    num_captions = read_split(data_dir, split).num_captions()
    return SplitFeatures(num_captions=num_captions, **{f"{tower}_features": arrays[tower] for tower in towers})


def _lacking(arrays: dict[str, np.ndarray], towers: Sequence[str], caption_rows: Optional[np.ndarray]) -> dict:
    """What each tower's cache lacks: `{tower: None}` (all of it) or `{"text": rows}` (those caption rows)."""
    lacking = {}
    for tower in towers:
        if tower not in arrays:
            lacking[tower] = caption_rows if tower == "text" else None
        elif tower == "text":
            wanted = np.arange(len(arrays[tower])) if caption_rows is None else np.asarray(caption_rows)
            unfilled = wanted[np.isnan(arrays[tower][wanted, 0])]
            if unfilled.size:
                lacking[tower] = unfilled
    return lacking


def _read_cached(targets: dict[str, Path]) -> dict[str, np.ndarray]:
    arrays = {}
    for tower, target in targets.items():
        if (target / FEATURE_CACHE.marker).is_file():
            with np.load(target / FEATURE_CACHE.marker) as stored:
                arrays[tower] = stored["features"]
    return arrays


def compute_features(
    model, data_dir: str | Path, split: str, towers: Sequence[str] = TOWERS, *,
    caption_rows: Optional[np.ndarray] = None, batch_size: int = 64, progress: bool = True,
) -> SplitFeatures:  # fmt: skip
    """Run each of `towers`' backbones over every image (`image`) or every caption (`text`) of a split, in order;
    with `caption_rows`, over those captions only (the other rows of `text_features` are NaN)."""
    computed = {
        "image_features": _image_features(model, data_dir, split, batch_size, progress) if "image" in towers else None,
        "text_features": (
            _text_features(model, data_dir, split, caption_rows, batch_size, progress) if "text" in towers else None
        ),
    }
    return SplitFeatures(num_captions=read_split(data_dir, split).num_captions(), **computed)


def _image_features(model, data_dir, split: str, batch_size: int, progress: bool) -> np.ndarray:
    images = make_image_dataset(data_dir, split, image_size=image_input(model), batch_size=batch_size)
    step = compiled(model, "image_features")
    rows = [
        step(batch["images"]).numpy()
        for batch in tqdm(images, desc=f"image features ({split})", unit="batch", disable=not progress)
    ]
    return np.concatenate(rows)


def _text_features(
    model, data_dir, split: str, caption_rows: Optional[np.ndarray], batch_size: int, progress: bool
) -> np.ndarray:
    captions = [caption for image_captions in read_split(data_dir, split).captions for caption in image_captions]
    if caption_rows is None:
        return _embed_captions(model, captions, batch_size, f"text features ({split})", progress)
    rows = np.asarray(caption_rows, dtype=np.int64)
    chosen = _embed_captions(model, [captions[row] for row in rows], batch_size, f"text features ({split})", progress)
    features = np.full((len(captions), chosen.shape[1]), np.nan, np.float32)
    features[rows] = chosen
    return features


def _embed_captions(model, captions: list[str], batch_size: int, desc: str, progress: bool) -> np.ndarray:
    # Captions outnumber images (about 5 to 1 in COCO) and cost far less each: bigger batches keep the
    # text backbone's matmuls large.
    text_batch = TEXT_BATCH_FACTOR * batch_size
    starts = range(0, len(captions), text_batch)
    bar = dict(desc=desc, unit="batch", disable=not progress)
    if not model.model_config.tower("text").trims_padding:
        step = compiled(model, "text_features")
        return np.concatenate([step(tf.constant(captions[i : i + text_batch])).numpy() for i in tqdm(starts, **bar)])
    # Captions are mostly shorter than `sequence_length`: run them sorted by length, each batch cut to its longest
    # caption, so no batch pays for columns of padding (the features are the same: see `TowerFamily.trims_padding`).
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
