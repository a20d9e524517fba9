"""`prepare`: validate a source's images, split by image, and write TFRecord shards + manifest, atomically.

Rerunning over a finished output with unchanged inputs is a no-op (a fingerprint of the inputs is in the manifest).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from tqdm.auto import tqdm  # widgets in Jupyter, text in a terminal

from dual_encoder import files, images
from dual_encoder.atomic import PREPARED_DATASET, atomic_directory, check_replaceable, writer_lock
from dual_encoder.config import DataConfig
from dual_encoder.data import tfrecords
from dual_encoder.data.sources import (
    DataError,
    Reason,
    Record,
    Skipped,
    SourceResult,
    read_metadata,
    read_source,
    with_metadata,
)

SPLITS = ("train", "validation")
FIRST_SKIPPED = 5  # skipped items a summary names (the manifest lists them all)
# The DataConfig fields that shape the written dataset (the others only concern reading it).
_PREPARE_FIELDS = ("validation_fraction", "split_seed", "shard_size", "max_image_pixels")


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_dataset` did.

    Args:
        output: the prepared dataset folder.
        images_written, captions_written: totals over all splits.
        skipped: count per reason (see `sources.Reason`).
        splits: images per split.
        skipped_now: True when the output was already up to date and nothing was written.
        first_skipped: the first `FIRST_SKIPPED` items skipped, to name them (manifest.json lists every one).
    """

    output: Path
    images_written: int
    captions_written: int
    skipped: dict[str, int]
    splits: dict[str, int]
    skipped_now: bool = False
    first_skipped: tuple[Skipped, ...] = ()

    def summary_line(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.items())
        skipped = f"{total} skipped: {reasons}" if total else "0 skipped"
        if self.skipped_now:
            return (
                f"{self.output} is up to date: {self.images_written} images ({self.captions_written} captions), "
                f"{skipped}"
            )
        return f"{self.images_written} images written ({self.captions_written} captions), {skipped}"


class BadImage(Exception):
    """An image file that cannot be used; carries its `Reason` and a detail for the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# --- images ------------------------------------------------------------------------------------------------------


def load_image(path: Path, max_pixels: int) -> tuple[bytes, str]:
    """The bytes to store for `path` and their format; raises `BadImage` for an unusable file.

    Only a regular file of bounded size is read (`dual_encoder.files`). The file itself when TF decodes it to
    the same RGB pixels as Pillow, else a lossless RGB PNG, upright per EXIF (`images.tf_readable`).
    """
    try:
        data = files.read_bytes(path)
        if not data:
            raise BadImage(Reason.EMPTY)
        return images.tf_readable(data, max_pixels)
    except files.FileRefusedError as refused:
        raise BadImage(refused.reason, refused.detail) from None


# --- split, fingerprint, atomic output ---------------------------------------------------------------------------


def split_records(records: list[Record], validation_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Split by image: records ordered by a seeded hash of their id, the first `validation_fraction` to validation.

    The order is deterministic and independent of the source's order; it is also the order written.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    ordered = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.image_id}".encode()).digest())
    count = round(len(ordered) * validation_fraction)
    if validation_fraction > 0 and len(ordered) > 1:
        count = min(max(count, 1), len(ordered) - 1)  # both splits non-empty when asked for both
    return {"train": ordered[count:], "validation": ordered[:count]}


def _fingerprint(kind: str, result: SourceResult, config: DataConfig) -> str:
    """A hash of everything the output depends on: records, image file sizes/mtimes, source skips, config."""
    digest = hashlib.sha256()
    settings = {"format_version": tfrecords.FORMAT_VERSION, "kind": kind}
    settings.update({field: getattr(config, field) for field in _PREPARE_FIELDS})
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for record in result.records:
        try:
            stat = record.path.stat()
            file_state = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            file_state = None
        digest.update(json.dumps([record.image_id, str(record.path), record.captions, file_state, record.metadata]).encode())
    for skipped in result.skipped:
        digest.update(json.dumps(dataclasses.astuple(skipped)).encode())
    return digest.hexdigest()


def _is_up_to_date(output: Path, fingerprint: str) -> Optional[dict[str, Any]]:
    """The existing manifest if `output` was prepared from the same inputs and all its files are intact.

    Checksums are checked too: a corrupted shard of the right size must be rewritten, not kept.
    """
    try:
        manifest = tfrecords.verify_dataset(output, checksums=True)
    except DataError:
        return None
    return manifest if manifest.get("fingerprint") == fingerprint else None


def _prepared_from(output: Path) -> Optional[str]:
    """The input fingerprint a prepared dataset at `output` records, if it has a readable manifest."""
    try:
        return tfrecords.read_manifest(output).get("fingerprint")
    except (DataError, OSError, AttributeError):
        return None


# --- prepare -----------------------------------------------------------------------------------------------------


def _ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(function, items)` on a thread pool, in order, with a bounded number of results in flight.

    Pillow releases the GIL while decoding and encoding, so threads use every core.
    """
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _SplitWriter:
    """Validates one split's images and streams the good ones into shards, collecting skips and format counts."""

    def __init__(self, config: DataConfig, bar: tqdm):
        self.config, self.bar = config, bar
        self.skipped: list[Skipped] = []
        self.formats: collections.Counter = collections.Counter()

    def _load(self, record: Record) -> tuple[Record, tuple[bytes, str] | BadImage]:
        try:
            return record, load_image(record.path, self.config.max_image_pixels)
        except BadImage as bad:
            return record, bad

    def examples(self, records: list[Record]) -> Iterator[tfrecords.Example]:
        for record, loaded in _ordered_map(self._load, records, os.cpu_count() or 1):
            self.bar.update(1)
            if isinstance(loaded, BadImage):
                self.skipped.append(Skipped(str(record.path), loaded.reason, loaded.detail))
                continue
            data, image_format = loaded
            self.formats[image_format] += 1
            yield tfrecords.Example(
                record.image_id, str(record.path), data, image_format, record.captions, record.metadata
            )

    def write(self, directory: Path, split: str, records: list[Record]) -> dict[str, Any]:
        """Write the split; return its manifest entry."""
        written = tfrecords.write_shards(self.examples(records), directory, split, self.config.shard_size)
        return {
            "images": written.images,
            "captions": written.captions,
            "shards": written.shards,
            "items": dataclasses.asdict(written.items),
        }


def _count_reasons(skipped: list[Skipped]) -> dict[str, int]:
    return dict(collections.Counter(s.reason for s in skipped).most_common())


def _summary(output: Path, manifest: dict[str, Any], skipped_now: bool) -> PrepareSummary:
    return PrepareSummary(
        output=output,
        images_written=manifest["counts"]["images"],
        captions_written=manifest["counts"]["captions"],
        skipped=manifest["skipped_counts"],
        splits={name: split["images"] for name, split in manifest["splits"].items()},
        skipped_now=skipped_now,
        first_skipped=tuple(Skipped(**item) for item in manifest.get("skipped", [])[:FIRST_SKIPPED]),
    )


def prepare_dataset(
    source: str,
    input: Optional[Path],
    images_dir: Path,
    output: Path,
    config: DataConfig,
    progress: bool = True,
    metadata: Optional[Path] = None,
    allow_outside: bool = False,
    overwrite: bool = False,
) -> PrepareSummary:
    """Read `source` (see `sources.read_source`), validate every image, and write a prepared dataset to `output`.

    `output` gets `{split}-NNNNN.tfrecord` shards, `{split}.jsonl` item tables and `manifest.json`. Bad items
    are skipped and recorded; `DataError` if the source is unusable or no image survives (the previous
    `output`, if any, is left as it was). A dataset already at `output` from the same inputs is kept as it is;
    one from other inputs is replaced only with `overwrite`; any other folder is refused. Annotation rows naming
    files outside `images_dir` are skipped unless `allow_outside`. `metadata`, a JSONL file of per-image fields
    (`sources.read_metadata`), is carried into the item tables.
    """
    output, images_dir = Path(output), Path(images_dir).resolve()  # absolute source paths in the manifest
    check_replaceable(output, PREPARED_DATASET, overwrite=True, error=DataError)  # a folder of another kind: refused
    with writer_lock(output):
        return _prepare_locked(source, input, images_dir, output, config, progress, overwrite, metadata, allow_outside)


def _prepare_locked(source, input, images_dir: Path, output: Path, config: DataConfig, progress: bool, overwrite: bool,
                    metadata: Optional[Path], allow_outside: bool):  # fmt: skip
    result = read_source(source, Path(input) if input is not None else None, images_dir, allow_outside)
    if metadata is not None:
        result = with_metadata(result, read_metadata(Path(metadata), images_dir))
    fingerprint = _fingerprint(source, result, config)
    existing = _is_up_to_date(output, fingerprint)
    if existing is not None:
        return _summary(output, existing, skipped_now=True)
    # The same inputs over a damaged copy (a corrupted shard): rewriting it is a repair, nothing is lost.
    overwrite = overwrite or _prepared_from(output) == fingerprint

    splits = split_records(result.records, config.validation_fraction, config.split_seed)
    skipped = list(result.skipped)
    formats: collections.Counter = collections.Counter()
    manifest_splits = {}
    with atomic_directory(output, PREPARED_DATASET, overwrite=overwrite, error=DataError) as directory:
        with tqdm(total=len(result.records), desc="prepare", unit="img", disable=not progress) as bar:
            for name in SPLITS:
                writer = _SplitWriter(config, bar)
                manifest_splits[name] = writer.write(directory, name, splits[name])
                skipped += writer.skipped
                formats += writer.formats
        images = sum(split["images"] for split in manifest_splits.values())
        if images == 0:
            reasons = ", ".join(f"{n} {r}" for r, n in _count_reasons(skipped).items())
            raise DataError(
                f"no valid image–caption pairs: every image was skipped ({reasons}); "
                f"image paths are resolved against {images_dir}"
            )
        manifest = {
            **PREPARED_DATASET.stamp(),
            "format_version": tfrecords.FORMAT_VERSION,
            "fingerprint": fingerprint,
            "source": {
                "kind": source,
                "input": str(Path(input).resolve()) if input is not None else None,
                "images_dir": str(images_dir),
            },
            "config": dataclasses.asdict(config),
            "counts": {
                "images": images,
                "captions": sum(split["captions"] for split in manifest_splits.values()),
                "skipped": len(skipped),
            },
            "formats": dict(sorted(formats.items())),
            "splits": manifest_splits,
            "skipped_counts": _count_reasons(skipped),
            "skipped": [dataclasses.asdict(s) for s in skipped],
        }
        tfrecords.write_manifest(directory, manifest)
    return _summary(output, manifest, skipped_now=False)
