"""tf.data pipelines over a prepared dataset: decode and resize images, one sampled caption per image per epoch."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterator, Optional

import keras
import numpy as np
import tensorflow as tf

from dual_encoder.data import tfrecords
from dual_encoder.data.sources import CAPTION_LABELS_KEY, LABELS_KEY, NEGATIVES_KEY, DataError

# Separate random streams for the epoch's image order and its caption choice.
_ORDER_STREAM, _CAPTION_STREAM = 0, 1
_OPEN_SHARDS = 64  # file handles kept open while reading records in a shuffled order


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared dataset, in its fixed (written) order.

    Args:
        image_ids: stable image ids.
        paths: the source image files.
        captions: every caption of each image.
        shards: the split's TFRecord files, in order.
        locations: int64 [N, 3]: each image's record as (shard number, byte offset, byte length).
        metadata: each image's metadata from `prepare --metadata`, or None.
    """

    image_ids: list[str]
    paths: list[Path]
    captions: list[list[str]]
    shards: list[Path]
    locations: np.ndarray
    metadata: list[Optional[dict]]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def num_captions(self) -> np.ndarray:
        """Captions per image, as `sample_caption_indices` takes them."""
        return np.array([len(c) for c in self.captions], dtype=np.int64)


def read_split(prepared: Path, split: str) -> SplitInfo:
    """The images and captions of `split` in a dataset written by `prepare_dataset`.

    The split's files are checked against the manifest's checksums (once per process, see `verify_dataset`),
    so a corrupted shard is one `DataError` naming it, not a TensorFlow traceback mid-training.
    """
    prepared = Path(prepared)
    manifest = tfrecords.read_manifest(prepared)
    if not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{prepared} is not a prepared dataset (its manifest.json lists no splits)")
    if split not in manifest["splits"]:
        raise DataError(f"no split '{split}' in {prepared}; it has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    tfrecords.verify_dataset(prepared, splits=[split])
    items_path = prepared / entry["items"]["file"]
    items = tfrecords.read_items(items_path)
    return SplitInfo(
        image_ids=[item["image_id"] for item in items],
        paths=[Path(item["source_path"]) for item in items],
        captions=[item["captions"] for item in items],
        shards=[prepared / shard["file"] for shard in entry["shards"]],
        locations=np.array([[i["shard"], i["offset"], i["length"]] for i in items], dtype=np.int64).reshape(-1, 3),
        metadata=[item.get("metadata") for item in items],
    )


@dataclasses.dataclass(frozen=True)
class LabelArrays:
    """Hashed labels of a split (item metadata `labels` / `caption_labels`), 0-padded: which captions fit which
    images. Caption j fits image i when every non-zero entry of `caption_labels[j]` is in `image_labels[i]`.

    Args:
        image_labels: int64 [N, L_image], one row per image in the split's fixed order.
        caption_labels: int64 [total captions, L_caption], captions flattened in order (image by image).
    """

    image_labels: np.ndarray
    caption_labels: np.ndarray


def _label_hash(label: str) -> int:
    # Stable across processes and machines (Python's hash() is salted); never 0, the padding.
    return (int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little") % ID_BUCKETS) | 1


def _padded(rows: list[list[int]]) -> np.ndarray:
    array = np.zeros((len(rows), max(1, max(map(len, rows), default=1))), dtype=np.int64)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    return array


def label_arrays(info: SplitInfo) -> Optional[LabelArrays]:
    """The split's `LabelArrays`, or None unless every image's metadata has labels for itself and its captions."""
    if not info.metadata or not all(m and LABELS_KEY in m and CAPTION_LABELS_KEY in m for m in info.metadata):
        return None
    images = [[_label_hash(label) for label in meta[LABELS_KEY]] for meta in info.metadata]
    captions = [
        [_label_hash(label) for label in meta[CAPTION_LABELS_KEY].get(caption, ())]
        for meta, image_captions in zip(info.metadata, info.captions)
        for caption in image_captions
    ]
    return LabelArrays(_padded(images), _padded(captions))


def require_images(prepared: Path, split: str, command: str) -> SplitInfo:
    """`read_split`, refusing an empty split with one line (`prepare` leaves validation empty at
    `validation_fraction=0` or with a single image), before any model is built or anything written."""
    info = read_split(prepared, split)
    if not info.image_ids:
        hint = " (prepare it with validation_fraction > 0 and at least 2 images)" if split == "validation" else ""
        raise DataError(f"{command}: the '{split}' split of {prepared} holds no images{hint}")
    return info


def negative_captions(info: SplitInfo) -> Optional[np.ndarray]:
    """Each caption's hard negative (item metadata `negative_captions`; "" where a caption has none), captions
    flattened in order; None unless every image's metadata has the key."""
    if not info.metadata or not all(m and NEGATIVES_KEY in m for m in info.metadata):
        return None
    rows = [meta[NEGATIVES_KEY].get(c, "") for meta, caps in zip(info.metadata, info.captions) for c in caps]
    return np.array(rows, dtype=object)


def epoch_order(num_images: int, epoch: int, seed: int) -> np.ndarray:
    """The order images are visited in `epoch`: a permutation seeded by (seed, epoch) of the fixed order."""
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(num_images)


def sample_caption_indices(num_captions: np.ndarray, epoch: int, seed: int, per_image: int = 1) -> np.ndarray:
    """For each image (fixed order), which `per_image` of its captions to use in `epoch`: int64 [N, per_image].

    Each image walks through a seeded permutation of its `n` captions, a new permutation every `n` picks, so
    every caption is used once per `n` picks; epoch `e` takes picks `e * per_image` to `(e + 1) * per_image - 1`
    (distinct captions when `per_image <= n`; an image with fewer captions repeats some). Images are grouped by
    `n`, so the result depends only on (num_captions, epoch, seed, per_image).
    """
    num_captions = np.asarray(num_captions, dtype=np.int64)
    if num_captions.size and num_captions.min() < 1:
        raise ValueError("every image needs at least one caption")
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    chosen = np.zeros((num_captions.size, per_image), dtype=np.int64)
    for count in np.unique(num_captions).tolist():
        members = np.flatnonzero(num_captions == count)
        for column, pick in enumerate(range(epoch * per_image, (epoch + 1) * per_image)):
            cycle, step = divmod(pick, count)
            rng = np.random.default_rng([seed, _CAPTION_STREAM, count, cycle])
            permutations = np.argsort(rng.random((members.size, count)), axis=1)
            chosen[members, column] = permutations[:, step]
    return chosen


def sampled_caption_rows(num_captions: np.ndarray, epochs: int, seed: int, per_image: int = 1) -> np.ndarray:
    """The rows of the split's flattened captions that epochs `0 .. epochs - 1` sample (`sample_caption_indices`),
    sorted: all the captions a run of `epochs` epochs reads."""
    num_captions = np.asarray(num_captions, dtype=np.int64)
    if num_captions.size == 0 or epochs * per_image >= num_captions.max():  # every image has used every caption
        return np.arange(int(num_captions.sum()), dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(num_captions)[:-1]])
    picked = [start[:, None] + sample_caption_indices(num_captions, epoch, seed, per_image) for epoch in range(epochs)]
    return np.unique(np.concatenate(picked, axis=1))


def image_ids(ids) -> tf.Tensor:
    """int64 ids of images (< 2**48, from their dataset ids): the loss treats every caption of an image that
    appears several times in a batch (`captions_per_image` > 1) as a positive of each copy."""
    return tf.strings.to_hash_bucket_fast(tf.convert_to_tensor(ids, dtype=tf.string), ID_BUCKETS)


# Ids and label hashes stay below 2**48: `losses.gather_across_replicas` moves integers between replicas as two
# exact float32 halves (multi-worker collectives refuse int64, TPUs float64).
ID_BUCKETS = 1 << 48


def caption_ids(captions) -> tf.Tensor:
    """int64 ids of captions, equal for captions identical after normalisation (case, whitespace, a trailing
    period): the loss treats such pairs in a batch as positives of each other."""
    text = tf.strings.lower(tf.convert_to_tensor(captions, dtype=tf.string), encoding="utf-8")
    text = tf.strings.regex_replace(tf.strings.strip(text), r"\s+", " ")
    text = tf.strings.regex_replace(text, r"\s*\.$", "")
    return tf.strings.to_hash_bucket_fast(text, ID_BUCKETS)


@dataclasses.dataclass(frozen=True)
class ImageResize:
    """How a decoded image of any size becomes a tower's square input.

    The default squashes to `size` x `size` (antialiased bilinear) and rounds to uint8. A paired pretrained tower
    gives its image converter's own resize instead (crop to the aspect ratio, its interpolation), kept in float32
    (`exact`) so the converter inside the tower sees what the preset's preprocessing would give it.
    """

    size: int
    crop_to_aspect_ratio: bool = False
    interpolation: str = "bilinear"
    antialias: bool = True
    exact: bool = False

    @property
    def dtype(self) -> tf.DType:
        return tf.float32 if self.exact else tf.uint8

    def spec(self, name: str = "images") -> tf.TensorSpec:
        """The tower's input batch: [None, size, size, 3] of `dtype`."""
        return tf.TensorSpec([None, self.size, self.size, 3], self.dtype, name=name)


def image_input(model) -> ImageResize:
    """The resize a model's image tower wants (`image_tower.image_resize`, else the default at `model.image_size`)."""
    return getattr(model.image_encoder, "image_resize", None) or ImageResize(int(model.image_size))


def decode_and_resize(image_bytes: tf.Tensor, image_size: int | ImageResize) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP bytes -> RGB [size, size, 3]: uint8 by the default antialiased squash to
    `image_size`, or as an `ImageResize` says."""
    return resize_image(tf.io.decode_image(image_bytes, channels=3, expand_animations=False), image_size)


def resize_image(image: tf.Tensor, image_size: int | ImageResize) -> tf.Tensor:
    """A decoded RGB image [H, W, 3] (any size) -> [size, size, 3] as `decode_and_resize` gives it."""
    resize = image_size if isinstance(image_size, ImageResize) else ImageResize(int(image_size))
    if resize == ImageResize(resize.size):
        image = tf.image.resize(image, [resize.size, resize.size], antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image = keras.ops.image.resize(
        tf.cast(image, tf.float32),
        (resize.size, resize.size),
        interpolation=resize.interpolation,
        antialias=resize.antialias,
        crop_to_aspect_ratio=resize.crop_to_aspect_ratio,
    )
    return image if resize.exact else tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _records_in_order(info: SplitInfo, order: np.ndarray) -> tf.data.Dataset:
    """(index in the fixed order, serialized example) for each index of `order`, read at its byte offset.

    TFRecord files only stream; the item table's offsets let one epoch visit every image in any order.
    """

    def generate() -> Iterator[tuple[int, bytes]]:
        handles: dict[int, object] = {}
        try:
            for index in order.tolist():
                shard, offset, length = info.locations[index].tolist()
                if shard not in handles:
                    if len(handles) == _OPEN_SHARDS:
                        handles.pop(next(iter(handles))).close()
                    handles[shard] = open(info.shards[shard], "rb")
                handle = handles[shard]
                handle.seek(offset)
                record = handle.read(length)
                if len(record) != length:
                    raise DataError(f"prepared dataset is corrupt: {info.shards[shard]} is truncated")
                yield index, record
        finally:
            for handle in handles.values():
                handle.close()

    signature = (tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string))
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def make_train_dataset(
    prepared: Path,
    split: str = "train",
    *,
    image_size: int | ImageResize,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    captions_per_image: int = 1,
    image_features: Optional[np.ndarray] = None,
    text_features: Optional[np.ndarray] = None,
) -> tf.data.Dataset:
    """One epoch of `{"images": uint8 [B, S, S, 3], "captions": string [B], "caption_ids": int64 [B]}` batches
    (`caption_ids` mark identical captions for the loss), plus `image_labels` and `caption_labels` (int64 rows of
    `label_arrays`) when the split's metadata says which captions fit which images, and `negative_captions`
    (string) with `negative_mask` (float32, 0 where a caption has no hard negative) when it has hard negatives.

    Images come in `epoch_order(N, epoch, seed)` (or the fixed order without `shuffle`), each once, with the
    caption `sample_caption_indices` picks for this epoch: two captions of one image never meet in a batch.

    With `captions_per_image` k > 1 each image comes with k of its captions: every caption key gains an axis
    (`captions` string [B, k], `caption_labels` [B, k, L'], ...) and `image_ids` int64 [B] says which image each
    row is, so the model scores all B * k captions against the batch while running the image tower B times.

    A locked tower's cached features (`features.SplitFeatures`: one row per image, one per caption in the
    split's order) replace its input: `image_features` [B, F] instead of decoded `images` (no image is read),
    `text_features` [B, (k,) F] instead of `captions` (hard negatives are then left out: they would need the
    text backbone). Either way the batches hold the same images and captions in the same order.
    """
    info = read_split(prepared, split)
    if drop_remainder and info.num_images < batch_size:
        raise DataError(f"split '{split}' has {info.num_images} images, fewer than one batch of {batch_size}")
    order = epoch_order(info.num_images, epoch, seed) if shuffle else np.arange(info.num_images)
    chosen = sample_caption_indices(info.num_captions(), epoch, seed, captions_per_image)
    start = np.concatenate([[0], np.cumsum(info.num_captions())[:-1]]).astype(np.int64)
    picked = (start[:, None] + chosen)[order]  # [N, k] rows of the flattened captions, in batch order
    flat = np.array([caption for captions in info.captions for caption in captions], dtype=object)
    labels, negatives = label_arrays(info), negative_captions(info)

    rows = {"caption_ids": caption_ids(flat.astype(str)).numpy()[picked] if flat.size else np.zeros_like(picked)}
    if text_features is None:
        rows["captions"] = flat[picked].astype(str)
        if negatives is not None:
            rows["negative_captions"] = negatives[picked].astype(str)
            rows["negative_mask"] = (np.char.str_len(rows["negative_captions"]) > 0).astype(np.float32)
    else:
        rows["text_features"] = text_features[picked]
    if image_features is not None:
        rows["image_features"] = image_features[order]
    if captions_per_image > 1:
        rows["image_ids"] = image_ids(info.image_ids).numpy()[order]
    else:  # one caption per image: caption keys lose the k axis
        rows = {key: value[:, 0] if key not in ("image_features",) else value for key, value in rows.items()}
    if labels is not None:
        rows["image_labels"] = labels.image_labels[order]
        caption_labels = labels.caption_labels[picked]
        rows["caption_labels"] = caption_labels[:, 0] if captions_per_image == 1 else caption_labels

    dataset = tf.data.Dataset.from_tensor_slices(rows)
    if image_features is None:
        images = _records_in_order(info, order).map(
            lambda index, serialized: decode_and_resize(tfrecords.parse_example(serialized)["image/encoded"], image_size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        dataset = tf.data.Dataset.zip(dataset, images).map(lambda row, image: {**row, "images": image})
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def make_image_dataset(prepared: Path, split: str, *, image_size: int | ImageResize, batch_size: int) -> tf.data.Dataset:
    """`{"images": uint8 [B, S, S, 3]}` batches in the split's fixed order (evaluation, feature cache, indexing)."""
    info = read_split(prepared, split)

    def to_image(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"images": decode_and_resize(tfrecords.parse_example(serialized)["image/encoded"], image_size)}

    records = tf.data.TFRecordDataset(tf.constant([str(p) for p in info.shards], dtype=tf.string))
    return records.map(to_image, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)
