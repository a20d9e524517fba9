"""Gallery sources (image folder, list file, prepared dataset split) -> image records and their embeddings."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from dual_encoder import files, images
from dual_encoder.config import DataConfig
from dual_encoder.data import tfrecords
from dual_encoder.data.pipeline import ImageResize, decode_and_resize, image_input, make_image_dataset, read_split
from dual_encoder.index.errors import GallerySourceError
from dual_encoder.index.items import ImageRecord
from dual_encoder.models.compiled import compiled

# Files are converted for TensorFlow at embed time only when they need it (EXIF-rotated, WebP, TIFF, HEIC …):
# fast zlib, as the PNG lives only until it is decoded.
_PNG_COMPRESS_LEVEL = 1


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """Every image under `path`, recursively, chosen by file extension (hidden files are ignored)."""

    path: Path


@dataclasses.dataclass(frozen=True)
class ImageList:
    """A text file with one image path per line; relative paths are relative to the list's folder.

    Blank lines and lines starting with `#` are ignored.
    """

    path: Path


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """A split of a dataset written by `prepare` (images come from its TFRecords, captions are kept)."""

    prepared: Path
    split: str


GallerySource = Union[ImageFolder, ImageList, DatasetSplit]


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file that was not indexed, and why: a short `reason` to count by (`files.Refused` values where the file
    was read) and a `detail` of this file's case."""

    path: str
    reason: str
    detail: str = ""

    @classmethod
    def refused(cls, path: str, refusal: files.FileRefusedError) -> "SkippedFile":
        return cls(files.printable(path), refusal.reason, refusal.detail)


def as_source(source: Union[str, Path, GallerySource]) -> GallerySource:
    """A source object as is; a path is a folder if it is a directory, else a list file."""
    if isinstance(source, (ImageFolder, ImageList, DatasetSplit)):
        return source
    path = Path(source)
    if path.is_dir():
        return ImageFolder(path)
    if path.is_file():
        return ImageList(path)
    raise GallerySourceError(f"gallery source {path} does not exist")


class Gallery(abc.ABC):
    """The images of one source: their records (hashed, in a fixed order) and a way to decode them.

    Args:
        records: one record per image that could be read.
        skipped: files left out while listing and hashing.
        source: where the gallery came from (for messages).
    """

    def __init__(self, records: list[ImageRecord], skipped: list[SkippedFile], source: str):
        self.records = records
        self.skipped = skipped
        self.source = source
        self.failures: dict[int, SkippedFile] = {}  # rows `images` dropped, and why (where it knows)

    @abc.abstractmethod
    def images(self, rows: Sequence[int], image_size: ImageResize, batch_size: int) -> tf.data.Dataset:
        """`{"row": int64 [B], "images": [B, S, S, 3]}` (as `image_size` says) for `rows` (increasing); undecodable rows are dropped."""

    def failure(self, row: int) -> SkippedFile:
        """Why `row` is missing from what `images` gave."""
        found = self.failures.get(row)
        return found or SkippedFile(self.records[row].path, files.Refused.CORRUPT, "TensorFlow could not decode it")


class FileGallery(Gallery):
    """Images read from their files (folder and list sources).

    Args:
        max_pixels: images whose header declares more pixels are skipped before any decoder runs.
    """

    def __init__(self, records: list[ImageRecord], skipped: list[SkippedFile], source: str, max_pixels: int):
        super().__init__(records, skipped, source)
        self.max_pixels = max_pixels

    def _read(self, rows: np.ndarray) -> Iterator[tuple[int, bytes]]:
        """`(row, bytes)` of each row's file, read again with every check (it may have changed since hashing),
        as bytes TensorFlow decodes upright (`images.tf_readable`); a refused row is recorded in `failures`."""
        for row in rows.tolist():
            path = self.records[row].path
            try:
                data = images.tf_readable(files.read_bytes(path), self.max_pixels, _PNG_COMPRESS_LEVEL)[0]
            except files.FileRefusedError as refused:
                self.failures[row] = SkippedFile.refused(path, refused)
                continue
            yield row, data

    def images(self, rows: Sequence[int], image_size: ImageResize, batch_size: int) -> tf.data.Dataset:
        rows = np.asarray(rows, dtype=np.int64)

        def decode(row: tf.Tensor, data: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"row": row, "images": decode_and_resize(data, image_size)}

        # Files are read in Python (`dual_encoder.files`), never by `tf.io.read_file`, which would block on a
        # FIFO and read a device forever.
        signature = (tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string))
        dataset = tf.data.Dataset.from_generator(lambda: self._read(rows), output_signature=signature)
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # A corrupt file fails its own element only; `embed_contents` reports the rows that went missing.
        return dataset.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)


class SplitGallery(Gallery):
    """Images of a prepared dataset split, decoded from its TFRecords by the data pipeline."""

    def __init__(self, records: list[ImageRecord], source: DatasetSplit):
        super().__init__(records, [], f"{source.prepared} [{source.split}]")
        self._split = source

    def images(self, rows: Sequence[int], image_size: ImageResize, batch_size: int) -> tf.data.Dataset:
        wanted = np.zeros(len(self.records), dtype=bool)
        wanted[np.asarray(rows, dtype=np.int64)] = True
        wanted = tf.constant(wanted)
        split = make_image_dataset(
            self._split.prepared, self._split.split, image_size=image_size, batch_size=batch_size
        )
        numbered = tf.data.Dataset.zip(tf.data.Dataset.range(len(self.records)), split.unbatch())
        return (
            numbered.filter(lambda row, batch: wanted[row])
            .map(lambda row, batch: {"row": row, "images": batch["images"]})
            .batch(batch_size)
        )


def open_gallery(
    source: Union[str, Path, GallerySource], progress: bool = True, max_pixels: int = DataConfig.max_image_pixels
) -> Gallery:
    """List and hash the images of `source`; unusable files are skipped and reported.

    Only regular files of bounded size with a UTF-8 name and at most `max_pixels` pixels (from the header) are
    kept (`dual_encoder.files`): FIFOs, devices, links to them and decompression bombs never reach a decoder.
    """
    source = as_source(source)
    if isinstance(source, DatasetSplit):
        return _open_split(source, progress)
    paths, skipped = _list_folder(source.path) if isinstance(source, ImageFolder) else _list_file(source.path)
    records = []
    for path in tqdm(paths, desc="hashing", unit="file", disable=not progress):
        try:
            records.append(_file_record(path, max_pixels))
        except files.FileRefusedError as refused:
            skipped.append(SkippedFile.refused(path, refused))
    return FileGallery(records, skipped, str(source.path), max_pixels)


def _file_record(path: str, max_pixels: int) -> ImageRecord:
    """The record of one image file, or `FileRefusedError` saying why it is not indexed."""
    if files.name_problem(path):
        raise files.FileRefusedError(files.Refused.BAD_NAME)
    info = files.check_regular(path)
    data, _ = files.read_image(path, max_pixels)
    return ImageRecord(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data), mtime=info.st_mtime)


def _list_folder(folder: Path) -> tuple[list[str], list[SkippedFile]]:
    paths, skipped = [], []
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.abspath(os.path.join(root, name))
            if Path(name).suffix.lower() in images.IMAGE_EXTENSIONS:
                paths.append(path)
            else:
                skipped.append(SkippedFile(files.printable(path), "not an image file (extension)"))
    return paths, skipped


def _list_file(list_path: Path) -> tuple[list[str], list[SkippedFile]]:
    try:
        lines = files.read_bytes(list_path, files.MAX_TEXT_BYTES).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:  # FileRefusedError (a FIFO, too large …) is an OSError
        raise GallerySourceError(f"cannot read image list {list_path}: {error}") from None
    base = list_path.absolute().parent
    paths, skipped = [], []
    for line in (line.strip() for line in lines):
        if line and not line.startswith("#"):
            path = os.path.abspath(base / line)
            if os.path.lexists(path):  # what kind of file it is, `open_gallery` checks
                paths.append(path)
            else:
                skipped.append(SkippedFile(path, "file not found"))
    return paths, skipped


def _open_split(source: DatasetSplit, progress: bool) -> Gallery:
    info = read_split(source.prepared, source.split)
    records = []
    examples = tfrecords.read_examples(info.shards)
    for path, captions, example in tqdm(
        zip(info.paths, info.captions, examples), total=info.num_images, desc="hashing", disable=not progress
    ):
        records.append(
            ImageRecord(
                path=str(path),
                sha256=hashlib.sha256(example.image_bytes).hexdigest(),
                size=len(example.image_bytes),
                mtime=path.stat().st_mtime if path.is_file() else None,
                caption=captions[0] if captions else None,
            )
        )
    return SplitGallery(records, source)


def embed_contents(
    model: keras.Model, gallery: Gallery, rows: Iterable[int], batch_size: int, progress: bool = True
) -> tuple[dict[str, np.ndarray], list[SkippedFile]]:
    """Embed the images `gallery.records[rows]` with the image tower, in batches; equal bytes are embedded once.

    Returns:
        `(vectors, skipped)`: float32 embeddings keyed by content sha256, and the rows that failed, with reasons.
    """
    rows = list(rows)
    first_row_of_hash = {}
    for row in rows:
        first_row_of_hash.setdefault(gallery.records[row].sha256, row)
    unique_rows = sorted(first_row_of_hash.values())
    image_size = image_input(model)
    encode = compiled(model, "encode_image")
    vectors: dict[str, np.ndarray] = {}
    with tqdm(total=len(unique_rows), desc="embedding", unit="img", disable=not progress) as bar:
        for batch in gallery.images(unique_rows, image_size, batch_size):
            embeddings = keras.ops.convert_to_numpy(encode(batch["images"]))
            for row, vector in zip(batch["row"].numpy(), embeddings):
                vectors[gallery.records[row].sha256] = vector
            bar.update(len(embeddings))
    skipped = []
    for row in rows:
        digest = gallery.records[row].sha256
        if digest not in vectors:  # failed: every row of these bytes, for the reason its first row failed
            why = gallery.failure(first_row_of_hash[digest])
            skipped.append(SkippedFile(gallery.records[row].path, why.reason, why.detail))
    return vectors, skipped
