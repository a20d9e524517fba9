"""Readers that turn image–caption sources (COCO JSON, CSV/TSV, JSONL, an image folder) into one record type.

Pure Python: no image is opened here; `prepare` validates the files the records point to.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional

from dual_encoder import files
from dual_encoder.errors import DualEncoderError
from dual_encoder.images import IMAGE_EXTENSIONS

# Column / key names accepted for the image and the caption in CSV, TSV and JSONL sources.
IMAGE_KEYS = ("image", "file_name")
CAPTION_KEYS = ("caption", "text")


class Reason:
    """The short, countable reasons an item is skipped (the keys of `PrepareSummary.skipped`)."""

    MISSING = "missing"
    EMPTY = "empty file"
    NOT_IMAGE = "not an image"
    CORRUPT = "corrupt"
    TOO_LARGE = "too large"
    NO_CAPTION = "no caption"
    BAD_ROW = "bad row"
    UNKNOWN_IMAGE = "unknown image"
    NOT_REGULAR = files.Refused.NOT_REGULAR  # a FIFO, device, socket or a symlink to one
    BAD_NAME = files.Refused.BAD_NAME
    OUTSIDE = "outside images dir"


class DataError(DualEncoderError):
    """A source that is unusable as a whole (unreadable or invalid annotation file, zero valid pairs)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image and all of its (cleaned, de-duplicated) captions.

    Args:
        image_id: stable identifier (the COCO id, else the path relative to the images folder).
        path: where the image file should be.
        captions: the image's captions, in source order.
        metadata: what a metadata file says of the image (see `read_metadata`), or None.
    """

    image_id: str
    path: Path
    captions: tuple[str, ...]
    metadata: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An item left out, with a countable `reason` (see `Reason`) and an optional human `detail`."""

    item: str
    reason: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class SourceResult:
    """What a reader produced: the usable records and the items it skipped."""

    records: list[Record]
    skipped: list[Skipped]


_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Strip, collapse whitespace and drop one trailing period (as the Keras recipe does); "" = drop it."""
    text = _WHITESPACE.sub(" ", text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def read_source(kind: str, input: Optional[Path], images_dir: Path, allow_outside: bool = False) -> SourceResult:
    """Read image–caption pairs of one `kind` (see `SOURCES`).

    `input` is the annotation file (`coco`, `csv`, `jsonl`); the `folder` source reads `images_dir` itself
    and ignores `input`. Image paths in annotation files are relative to `images_dir`; absolute or `../`
    paths that lead out of it are skipped (`Reason.OUTSIDE`) unless `allow_outside`.
    Raises `DataError` for an unusable source or one without a single valid pair.
    """
    if kind not in SOURCES:
        raise DataError(f"unknown source kind '{kind}'; choose one of {sorted(SOURCES)}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    reader, needs_input = SOURCES[kind]
    if needs_input:
        if input is None:
            raise DataError(f"the '{kind}' source needs an annotation file")
        try:
            files.check_regular(input)
        except files.FileRefusedError as refused:
            missing = refused.reason == files.Refused.MISSING
            raise DataError(f"annotation file not found: {input}" if missing else f"{input}: {refused}") from None
    result = reader(Path(input) if input is not None else None, images_dir)
    if not allow_outside:
        result = _confine(result, images_dir)
    if not result.records:
        raise DataError(f"no valid image–caption pairs in the {kind} source ({len(result.skipped)} items skipped)")
    return result


def _confine(result: SourceResult, images_dir: Path) -> SourceResult:
    """The records whose image path stays inside `images_dir` (lexically); the others skipped as outside.

    An annotation file is data from elsewhere: without this, a row could make prepare read any file.
    """
    root = os.path.normpath(os.path.abspath(images_dir))
    inside, skipped = [], list(result.skipped)
    for record in result.records:
        path = os.path.normpath(os.path.abspath(record.path))
        if os.path.commonpath([root, path]) == root:
            inside.append(record)
        else:
            skipped.append(Skipped(record.image_id, Reason.OUTSIDE, "use --allow-outside to read it"))
    return SourceResult(inside, skipped)


class _Collector:
    """Merges (image, caption) pairs: one record per image, captions de-duplicated in first-seen order."""

    def __init__(self, images_dir: Path):
        self.images_dir = images_dir
        self._paths: dict[str, Path] = {}
        self._captions: dict[str, dict[str, None]] = {}
        self.skipped: list[Skipped] = []

    def add_image(self, image_id: str, path: Path) -> None:
        self._paths.setdefault(image_id, path)
        self._captions.setdefault(image_id, {})

    def has_image(self, image_id: str) -> bool:
        return image_id in self._paths

    def add_caption(self, image_id: str, caption: str) -> None:
        caption = clean_caption(caption)
        if caption:
            self._captions[image_id].setdefault(caption, None)

    def add_pair(self, image_name: str, caption: str) -> None:
        """A pair that names its image by a path relative to `images_dir` (CSV, JSONL); "" adds no caption."""
        image_id = _relative_name(image_name)
        self.add_image(image_id, self.images_dir / image_id)
        self.add_caption(image_id, caption)

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.skipped.append(Skipped(item, reason, detail))

    def result(self) -> SourceResult:
        records = []
        for image_id, path in self._paths.items():
            captions = tuple(self._captions[image_id])
            if captions:
                records.append(Record(image_id, path, captions))
            else:
                self.skip(image_id, Reason.NO_CAPTION)
        return SourceResult(records, self.skipped)


def _relative_name(name: str) -> str:
    """A stable id for an image named in an annotation file: its normalised POSIX relative path."""
    return PurePosixPath(os.path.normpath(name.strip().replace("\\", "/"))).as_posix()


def _read_text(path: Path) -> str:
    """A UTF-8 (optionally BOM-prefixed) text file; `DataError` names the first line that is not UTF-8."""
    try:
        raw = files.read_bytes(path, files.MAX_TEXT_BYTES)
    except files.FileRefusedError as refused:
        raise DataError(f"{files.printable(path)}: {refused}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8") from None


def _first_key(row: dict, keys: Iterable[str]) -> Optional[str]:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _read_coco(input: Path, images_dir: Path) -> SourceResult:
    try:
        data = json.loads(_read_text(input))
    except json.JSONDecodeError as error:
        raise DataError(f"{input}: not valid JSON (line {error.lineno}: {error.msg})") from None
    is_coco = isinstance(data, dict) and all(isinstance(data.get(key), list) for key in ("images", "annotations"))
    if not is_coco:
        raise DataError(f"{input}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    collector = _Collector(images_dir)
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            collector.skip(f"images[{index}]", Reason.BAD_ROW, "needs 'id' and 'file_name'")
            continue
        collector.add_image(str(image["id"]), images_dir / _relative_name(image["file_name"]))
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            collector.skip(f"annotations[{index}]", Reason.BAD_ROW, "needs 'image_id' and 'caption'")
            continue
        image_id = str(annotation.get("image_id"))
        if not collector.has_image(image_id):
            collector.skip(f"annotations[{index}]", Reason.UNKNOWN_IMAGE, f"image_id {image_id} is not in 'images'")
            continue
        collector.add_caption(image_id, annotation["caption"])
    return collector.result()


def _csv_dialect(path: Path, header: str) -> str:
    """The delimiter: tab for .tsv, else the first of comma/tab/semicolon that splits the header into our columns."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    for delimiter in (",", "\t", ";"):
        columns = {c.strip().lower() for c in next(csv.reader([header], delimiter=delimiter), [])}
        if columns & set(IMAGE_KEYS) and columns & set(CAPTION_KEYS):
            return delimiter
    raise DataError(
        f"{path}: header must name an image column {IMAGE_KEYS} and a caption column {CAPTION_KEYS}"
    )


def _read_csv(input: Path, images_dir: Path) -> SourceResult:
    text = _read_text(input)
    header = text.splitlines()[0] if text.strip() else ""
    if not header:
        raise DataError(f"{input}: empty file")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_csv_dialect(input, header), strict=True)
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
    collector = _Collector(images_dir)
    try:
        for row in reader:
            image = _first_key(row, IMAGE_KEYS)
            if image is None:
                collector.skip(f"{input.name}:{reader.line_num}", Reason.BAD_ROW, "no image")
                continue
            collector.add_pair(image, _first_key(row, CAPTION_KEYS) or "")
    except csv.Error as error:
        # `DictReader.line_num` is only updated after a good row: the failing line is the inner reader's.
        raise DataError(f"{input}: not valid CSV (line {reader.reader.line_num}: {error})") from None
    return collector.result()


def _read_jsonl(input: Path, images_dir: Path) -> SourceResult:
    collector = _Collector(images_dir)
    for number, line in enumerate(_read_text(input).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{input}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{input}: line {number} is not a JSON object")
        image = _first_key(row, IMAGE_KEYS)
        if image is None:
            collector.skip(f"{input.name}:{number}", Reason.BAD_ROW, f"needs one of {IMAGE_KEYS}")
            continue
        collector.add_pair(image, _first_key(row, CAPTION_KEYS) or "")
    return collector.result()


def _read_folder(input: Optional[Path], images_dir: Path) -> SourceResult:
    del input  # the folder is `images_dir`
    collector = _Collector(images_dir)
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()):
        image_id = path.relative_to(images_dir).as_posix()
        problem = files.name_problem(path) or _not_regular(path)
        if problem:
            collector.skip(files.printable(image_id), problem)
            continue
        collector.add_image(image_id, path)
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            for line in _read_text(sidecar).splitlines():
                collector.add_caption(image_id, line)
    return collector.result()


def _not_regular(path: Path) -> Optional[str]:
    """Why `path` cannot be read as an image file (a FIFO, device, dangling link …), or None; opens nothing."""
    try:
        files.check_regular(path)
    except files.FileRefusedError as refused:
        return refused.reason
    return None


# kind -> (reader, whether it needs an annotation file)
SOURCES: dict[str, tuple[Callable[[Optional[Path], Path], SourceResult], bool]] = {
    "coco": (_read_coco, True),
    "csv": (_read_csv, True),
    "jsonl": (_read_jsonl, True),
    "folder": (_read_folder, False),
}


# Metadata keys training reads: an image's labels, and per caption the labels it requires of an image (a caption
# fits every image that has all of its labels; see `data.pipeline.label_arrays`).
LABELS_KEY, CAPTION_LABELS_KEY = "labels", "caption_labels"
# Metadata key of hard negatives: caption -> a caption of the same form that is false of the image.
NEGATIVES_KEY = "negative_captions"


def read_metadata(path: Path, images_dir: Path) -> dict[Path, dict]:
    """Per-image metadata from a JSONL file: one object per line naming its image (`image` or `file_name`,
    relative to `images_dir`) plus any other fields (e.g. the synthetic generator's scene). -> image path ->
    the other fields. A bad line raises `DataError` naming it."""
    metadata: dict[Path, dict] = {}
    for number, line in enumerate(_read_text(Path(path)).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        name = _first_key(row, IMAGE_KEYS) if isinstance(row, dict) else None
        if not name:
            raise DataError(f"{path}:{number}: expected an object with one of {list(IMAGE_KEYS)}")
        fields = {key: value for key, value in row.items() if key not in IMAGE_KEYS}
        metadata[images_dir / _relative_name(name)] = fields
    return metadata


def with_metadata(result: SourceResult, metadata: dict[Path, dict]) -> SourceResult:
    """`result` with each record's metadata attached (records that the metadata does not name keep None).

    Per-caption fields (`CAPTION_LABELS_KEY`, `NEGATIVES_KEY`: caption -> value) are keyed by the caption as
    `prepare` cleans it, so they find the caption the item table holds.
    """
    records = [dataclasses.replace(r, metadata=_cleaned_keys(metadata.get(r.path, r.metadata))) for r in result.records]
    return SourceResult(records, result.skipped)


def _cleaned_keys(metadata: Optional[dict]) -> Optional[dict]:
    if not metadata:
        return metadata
    cleaned = dict(metadata)
    for key in (CAPTION_LABELS_KEY, NEGATIVES_KEY):
        if isinstance(metadata.get(key), dict):
            cleaned[key] = {clean_caption(caption): value for caption, value in metadata[key].items()}
    return cleaned
