"""The one TFRecord feature spec for prepared datasets, the sharded writer and parser, and manifest helpers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import tensorflow as tf

from dual_encoder.atomic import file_sha256
from dual_encoder.data.sources import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# TFRecord framing: uint64 length + uint32 masked CRC before each record, uint32 masked CRC after it.
_RECORD_HEADER, _RECORD_FOOTER = 12, 4

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
        metadata: per-image fields from a metadata file (kept in the item table only), or None.
    """

    image_id: str
    source_path: str
    image_bytes: bytes
    image_format: str
    captions: tuple[str, ...]
    metadata: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A written file of the dataset: name (relative to the dataset folder), size and sha256."""

    file: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "FileInfo":
        return cls(path.name, path.stat().st_size, file_sha256(path))


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """What `write_shards` wrote for one split.

    Args:
        images, captions: totals.
        shards: the TFRecord shards, in order, each with its image count.
        items: the item table (see `write_shards`).
    """

    images: int
    captions: int
    shards: list[dict[str, Any]]
    items: FileInfo


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


def write_shards(examples: Iterable[Example], directory: Path, split: str, shard_size: int) -> SplitFiles:
    """Write `examples` in order to `directory/{split}-NNNNN.tfrecord` (at most `shard_size` per shard) and
    the split's item table `{split}.jsonl`.

    The item table has one JSON line per image — id, source path, captions and where its record lies
    (shard number, byte offset and length of the serialized example) — so readers can list a split
    without reading image bytes and read its records in any order.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards: list[dict[str, Any]] = []
    captions = 0
    writer, offset, count = None, 0, 0
    items_path = directory / f"{split}.jsonl"

    def close() -> None:
        writer.close()
        shards.append({**dataclasses.asdict(FileInfo.of(directory / name)), "images": count})

    with open(items_path, "w", encoding="utf-8") as items:
        for example in examples:
            if writer is None:
                name, offset, count = f"{split}-{len(shards):05d}.tfrecord", 0, 0
                writer = tf.io.TFRecordWriter(str(directory / name))
            record = serialize_example(example)
            writer.write(record)
            item = {
                "image_id": example.image_id,
                "source_path": example.source_path,
                "captions": list(example.captions),
                "shard": len(shards),
                "offset": offset + _RECORD_HEADER,
                "length": len(record),
            }
            if example.metadata is not None:
                item["metadata"] = example.metadata
            items.write(json.dumps(item, ensure_ascii=False) + "\n")
            offset += _RECORD_HEADER + len(record) + _RECORD_FOOTER
            count += 1
            captions += len(example.captions)
            if count == shard_size:
                close()
                writer = None
        if writer is not None:
            close()
    return SplitFiles(sum(s["images"] for s in shards), captions, shards, FileInfo.of(items_path))


def read_items(path: Path) -> list[dict[str, Any]]:
    """A split's item table (see `write_shards`)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


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
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a prepared-dataset manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    if not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: not a prepared-dataset manifest (no 'splits')")
    return manifest


def dataset_files(manifest: dict[str, Any], splits: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every file a manifest lists (item tables and shards of `splits`, default all), as `FileInfo`-shaped dicts.

    `DataError` for a malformed manifest, or a file entry that is not a plain name inside the dataset folder.
    """
    try:
        chosen = manifest["splits"] if splits is None else {name: manifest["splits"][name] for name in splits}
        entries = [entry for split in chosen.values() for entry in (split["items"], *split["shards"])]
        names = [entry["file"] for entry in entries]
    except (KeyError, TypeError, AttributeError) as error:
        raise DataError(f"malformed prepared-dataset manifest ({type(error).__name__}: {error})") from None
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise DataError(f"prepared-dataset manifest lists {name!r}: not a file name inside the dataset")
    return entries


def verify_dataset(directory: Path, checksums: bool = True, splits: Iterable[str] | None = None) -> dict[str, Any]:
    """The manifest of `directory`, after checking each listed file's presence and size (and sha256 if
    `checksums`); `DataError` names the first file that does not match.

    A file whose checksum passed is not hashed again in this process while its size, mtime and inode stay the
    same, so a training run that opens its dataset every epoch pays for one pass.
    """
    manifest = read_manifest(directory)
    for entry in dataset_files(manifest, splits):
        _verify_file(Path(directory) / entry["file"], entry, checksums)
    return manifest


_VERIFIED: set[tuple] = set()  # (path, inode, size, mtime_ns, sha256) of files whose checksum matched


def _verify_file(path: Path, entry: dict[str, Any], checksums: bool) -> None:
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise DataError(f"prepared dataset is incomplete: {path} is missing or has the wrong size")
    if not checksums:
        return
    info = path.stat()
    key = (str(path.absolute()), info.st_ino, info.st_size, info.st_mtime_ns, entry["sha256"])
    if key in _VERIFIED:
        return
    try:
        matches = file_sha256(path) == entry["sha256"]
    except OSError as error:
        raise DataError(f"prepared dataset is unreadable: {path} ({error})") from None
    if not matches:
        raise DataError(f"prepared dataset is corrupt: checksum mismatch for {path}")
    _VERIFIED.add(key)
