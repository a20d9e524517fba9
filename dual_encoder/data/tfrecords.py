"""The one TFRecord feature spec for prepared datasets, the sharded writer and parser, and manifest helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import tensorflow as tf

from dual_encoder.data.sources import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

# The one feature spec: every prepared example has exactly these features.
FEATURE_SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),  # the image file's bytes (or a lossless PNG of them)
    "image/format": tf.io.FixedLenFeature([], tf.string),  # jpeg | png | gif | bmp
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/source_path": tf.io.FixedLenFeature([], tf.string),
    "captions": tf.io.RaggedFeature(tf.string),  # all of the image's captions
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One prepared image with all of its captions.

    Args:
        image_id: the record's stable id.
        source_path: the file it came from.
        image_bytes: encoded image, as stored.
        image_format: `jpeg`, `png`, `gif` or `bmp`.
        captions: every caption of the image.
    """

    image_id: str
    source_path: str
    image_bytes: bytes
    image_format: str
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """A written shard: file name (relative to the dataset folder), example count, caption count, sha256."""

    file: str
    images: int
    captions: int
    sha256: str


def _bytes_feature(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def serialize_example(example: Example) -> bytes:
    """The `tf.train.Example` wire format of `example`, following `FEATURE_SPEC`."""
    features = {
        "image/encoded": _bytes_feature([example.image_bytes]),
        "image/format": _bytes_feature([example.image_format.encode()]),
        "image/id": _bytes_feature([example.image_id.encode()]),
        "image/source_path": _bytes_feature([example.source_path.encode()]),
        "captions": _bytes_feature(c.encode() for c in example.captions),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parse one serialized example (eagerly or inside tf.data); `captions` is a 1-D string tensor."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def decode_example(serialized: bytes) -> Example:
    """An `Example` back from its serialized bytes (eager; for inspection and tests)."""
    parsed = parse_example(tf.constant(serialized))
    return Example(
        image_id=parsed["image/id"].numpy().decode(),
        source_path=parsed["image/source_path"].numpy().decode(),
        image_bytes=parsed["image/encoded"].numpy(),
        image_format=parsed["image/format"].numpy().decode(),
        captions=tuple(c.decode() for c in parsed["captions"].numpy()),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(examples: Iterable[Example], directory: Path, prefix: str, shard_size: int) -> list[ShardInfo]:
    """Write `examples` in order to `directory/{prefix}-NNNNN.tfrecord`, at most `shard_size` per shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards: list[ShardInfo] = []
    writer, name, images, captions = None, "", 0, 0

    def close() -> None:
        writer.close()
        shards.append(ShardInfo(name, images, captions, file_sha256(directory / name)))

    for example in examples:
        if writer is None:
            name, images, captions = f"{prefix}-{len(shards):05d}.tfrecord", 0, 0
            writer = tf.io.TFRecordWriter(str(directory / name))
        writer.write(serialize_example(example))
        images, captions = images + 1, captions + len(example.captions)
        if images == shard_size:
            close()
            writer = None
    if writer is not None:
        close()
    return shards


def read_examples(paths: Iterable[Path]) -> Iterator[Example]:
    """Every example of the given shards, in order (eager; for inspection and tests)."""
    for record in tf.data.TFRecordDataset([str(p) for p in paths]):
        yield decode_example(record.numpy())


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` (written last by `prepare`, so its presence marks a complete dataset)."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    temporary = directory / f".{MANIFEST_NAME}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset; `DataError` if there is none or it is unreadable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"not a prepared dataset (no {MANIFEST_NAME}): {directory}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable manifest ({error})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def verify_files(directory: Path, files: Iterable[dict[str, Any]]) -> None:
    """Check each `{"file", "sha256"}` entry against the file on disk; `DataError` names the first mismatch."""
    for entry in files:
        path = Path(directory) / entry["file"]
        if not path.is_file():
            raise DataError(f"prepared dataset is incomplete: {path} is missing")
        if file_sha256(path) != entry["sha256"]:
            raise DataError(f"prepared dataset is corrupt: checksum mismatch for {path}")
