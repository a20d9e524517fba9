"""Build an index from a gallery source, add new or changed images to it, remove images from it, sync it with a
folder."""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from dual_encoder.atomic import readable_path, writer_lock
from dual_encoder.config import DataConfig, IndexConfig
from dual_encoder.index.embed import (
    GallerySource,
    ImageFolder,
    SkippedFile,
    embed_contents,
    open_gallery,
)
from dual_encoder.index.errors import GallerySourceError, IndexConfigError
from dual_encoder.index.store import ImageIndex, check_replaceable, read_manifest
from dual_encoder.models import load_checked_model


@dataclasses.dataclass(frozen=True)
class IndexSummary:
    """What a build, add or remove did.

    Args:
        index_dir: the index directory.
        count: items in the index afterwards.
        kind: the index's search kind.
        dtype: its embedding dtype.
        dim: its embedding dimension.
        embedded: images run through the image tower (equal bytes count once).
        reused: new paths whose content was already indexed (embedding copied, not recomputed).
        replaced: indexed paths whose content changed (re-embedded, new id).
        removed: items removed.
        unchanged: offered images already indexed with the same content.
        skipped: files not indexed (or paths not found for removal), with reasons (`skipped_counts` counts them).
        written: whether the index on disk was (re)written.
        seconds: wall time.
        added_paths: the paths that came in new (not replacing an indexed path), in order.
        replaced_paths: the indexed paths whose content changed.
        removed_paths: the paths whose items were removed (not counting replaced ones).
        rebuild_due: the approximate structure was trained on a gallery of a very different size
            (`dual-encoder index rebuild` retrains it from the stored embeddings).
    """

    index_dir: Path
    count: int
    kind: str
    dtype: str
    dim: int
    embedded: int = 0
    reused: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[SkippedFile] = dataclasses.field(default_factory=list)
    written: bool = True
    seconds: float = 0.0
    added_paths: list[str] = dataclasses.field(default_factory=list)
    replaced_paths: list[str] = dataclasses.field(default_factory=list)
    removed_paths: list[str] = dataclasses.field(default_factory=list)
    rebuild_due: bool = False

    @property
    def skipped_counts(self) -> dict[str, int]:
        """Skipped files per reason, the most frequent first."""
        return dict(collections.Counter(skipped.reason for skipped in self.skipped).most_common())


def build_index(
    model_dir: Union[str, Path],
    source: Union[str, Path, GallerySource],
    output: Union[str, Path],
    config: IndexConfig = IndexConfig(),
    progress: bool = True,
    max_image_pixels: int = DataConfig.max_image_pixels,
    overwrite: bool = False,
) -> IndexSummary:
    """Embed every image of `source` with the image tower of `model_dir` and save a new index at `output`.

    An existing index at `output` is replaced atomically, and only with `overwrite`; any other folder is
    refused. Images are read as people see them (`dual_encoder.images`: EXIF orientation applied; JPEG, PNG, GIF,
    BMP, WebP, TIFF, and HEIC with pillow-heif). Unreadable, oversized and non-image files are skipped and listed in
    the summary with their reasons.

    Args:
        model_dir: a directory written by `save_model`.
        source: an image folder, a list file, or `DatasetSplit(prepared_dir, split)`.
        output: the index directory to write.
        config: dtype, kind and ANN parameters.
        progress: show progress bars.
        max_image_pixels: images larger than this (read from their header) are skipped as too large.
        overwrite: replace an existing index at `output`.

    Example:
        >>> summary = build_index("runs/model", "photos/", "photos.index", IndexConfig(dtype="float16"))
        >>> summary.count, [s.path for s in summary.skipped]
    """
    started = time.perf_counter()
    output = Path(output).absolute()
    check_replaceable(output, overwrite)  # before the lock and the slow part: a refusal touches nothing
    with writer_lock(output):
        return _build(model_dir, source, output, config, progress, overwrite, started, max_image_pixels)


def _build(
    model_dir, source, output: Path, config: IndexConfig, progress: bool, overwrite: bool, started: float,
    max_image_pixels: int,
):  # fmt: skip
    check_replaceable(output, overwrite)  # again, now that no other writer is at work
    model, model_record = load_checked_model(model_dir)
    gallery = open_gallery(source, progress, max_image_pixels)
    rows = range(len(gallery.records))
    vectors, failed = embed_contents(model, gallery, rows, config.embed_batch_size, progress)
    kept = [gallery.records[r] for r in rows if gallery.records[r].sha256 in vectors]
    skipped = gallery.skipped + failed
    if not kept:
        raise GallerySourceError(f"no images could be indexed from {gallery.source} ({len(skipped)} files skipped)")
    index = ImageIndex.create(np.stack([vectors[r.sha256] for r in kept]), kept, config, model_record)
    path = index.save(output, overwrite=overwrite)
    return _summary(index, path, started, embedded=len(vectors), skipped=skipped)


def add_to_index(
    index_dir: Union[str, Path],
    images: Union[str, Path, GallerySource],
    model_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    max_image_pixels: int = DataConfig.max_image_pixels,
) -> IndexSummary:
    """Add the images of a source to an index; only content the index has not seen is embedded.

    A path already indexed with the same content is left alone; with new content it is re-embedded
    (and gets a new id). A new path whose content is already indexed reuses that embedding. Nothing
    is written when nothing changes.

    Args:
        index_dir: an existing index.
        images: an image folder, a list file, or a `DatasetSplit`.
        model_dir: the model to embed with; defaults to the one recorded in the index, and must
            have the same fingerprint.
        progress: show progress bars.
        max_image_pixels: see `build_index`.
    """
    started = time.perf_counter()
    with _locked_index(index_dir):
        return _add(index_dir, images, model_dir, progress, started, max_image_pixels)


def _add(index_dir, images, model_dir, progress: bool, started: float, max_image_pixels: int) -> IndexSummary:
    index = ImageIndex.load(index_dir)
    gallery = open_gallery(images, progress, max_image_pixels)
    return _update(index, index_dir, gallery, [], model_dir, progress, started)


@dataclasses.dataclass
class _Plan:
    """How the records of a gallery change an index: which rows they replace, which records are new to it."""

    unchanged: int = 0
    replaced: list[int] = dataclasses.field(default_factory=list)  # index rows whose path has new content
    reuse: list[int] = dataclasses.field(default_factory=list)  # gallery rows whose content is already indexed
    to_embed: list[int] = dataclasses.field(default_factory=list)  # gallery rows to run through the image tower


def _plan(index: ImageIndex, gallery) -> _Plan:
    """Compare each gallery record with the index by path and content hash (`ImageRecord.sha256`)."""
    row_of_path = {path: row for row, path in enumerate(index.items.paths)}
    indexed_hashes = {digest.decode("ascii") for digest in index.items.sha256}
    plan = _Plan()
    for new_row, record in enumerate(gallery.records):
        old_row = row_of_path.get(record.path)
        if old_row is not None and index.items.sha256[old_row].decode("ascii") == record.sha256:
            plan.unchanged += 1
            continue
        if old_row is not None:
            plan.replaced.append(old_row)
        (plan.reuse if record.sha256 in indexed_hashes else plan.to_embed).append(new_row)
    return plan


def _update(
    index: ImageIndex, index_dir, gallery, doomed: list[int], model_dir, progress: bool, started: float
) -> IndexSummary:
    """Add a gallery's new and changed images to `index` and remove the rows `doomed`; save it once, atomically."""
    plan = _plan(index, gallery)
    row_of_hash = {digest.decode("ascii"): row for row, digest in enumerate(index.items.sha256)}
    # Every new path takes the embedding of its content: from the index, or freshly computed.
    vectors = {gallery.records[r].sha256: index.embeddings[row_of_hash[gallery.records[r].sha256]] for r in plan.reuse}
    embedded, skipped = 0, list(gallery.skipped)
    if plan.to_embed:
        model, _ = load_checked_model(model_dir or index.model.directory, expected=index.model)
        fresh, failed = embed_contents(model, gallery, plan.to_embed, index.config.embed_batch_size, progress)
        vectors.update(fresh)
        embedded, skipped = len(fresh), skipped + failed
    added = [gallery.records[r] for r in sorted(plan.reuse + plan.to_embed) if gallery.records[r].sha256 in vectors]
    replaced_paths = [index.items.paths[row] for row in plan.replaced]
    # A changed file that can no longer be embedded still loses its stale item: it is replaced by nothing.
    doomed = sorted(set(doomed) - set(plan.replaced))
    removed_paths = [index.items.paths[row] for row in doomed]
    if not added and not plan.replaced and not doomed:
        return _summary(index, index_dir, started, unchanged=plan.unchanged, skipped=skipped, written=False)
    index.remove(sorted(plan.replaced + doomed))
    if added:
        index.add(added, np.stack([vectors[record.sha256] for record in added]))
    path = index.save(index_dir, overwrite=True)
    replaced = set(replaced_paths)
    return _summary(
        index, path, started, embedded=embedded, reused=len(plan.reuse), replaced=len(plan.replaced),
        removed=len(doomed), unchanged=plan.unchanged, skipped=skipped,
        added_paths=[record.path for record in added if record.path not in replaced],
        replaced_paths=replaced_paths, removed_paths=removed_paths,
    )  # fmt: skip


def sync_index(
    index_dir: Union[str, Path],
    folder: Union[str, Path],
    model_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
    max_image_pixels: int = DataConfig.max_image_pixels,
) -> IndexSummary:
    """Make the index's items under `folder` match the folder's images now, in one atomic update.

    New files are added, files whose content changed (their sha256 differs from the indexed one) are re-embedded
    (new ids), and items under `folder` whose file is gone — or can no longer be read as an image (it is then in
    `skipped` too) — are removed. Items outside `folder` are left alone. The whole update holds the index's writer
    lock and is saved once: a reader sees the index before the sync or after it, never a part. Nothing is written
    when nothing changed.

    Args:
        index_dir: an existing index.
        folder: the image folder to mirror (searched recursively, as `index build --images`).
        model_dir, progress, max_image_pixels: see `add_to_index`.

    Example:
        >>> summary = sync_index("photos.index", "photos/")
        >>> summary.added_paths, summary.replaced_paths, summary.removed_paths
    """
    started = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise GallerySourceError(f"{folder} is not a folder: sync mirrors an image folder")
    with _locked_index(index_dir):
        index = ImageIndex.load(index_dir)
        gallery = open_gallery(ImageFolder(folder), progress, max_image_pixels)
        present = {record.path for record in gallery.records}
        inside = os.path.abspath(folder).rstrip(os.sep) + os.sep
        gone = [row for row, path in enumerate(index.items.paths) if path.startswith(inside) and path not in present]
        return _update(index, index_dir, gallery, gone, model_dir, progress, started)


def remove_from_index(
    index_dir: Union[str, Path], paths: Optional[Iterable[Union[str, Path]]] = None, missing: bool = False
) -> IndexSummary:
    """Remove items by path (a folder path removes everything under it) and/or items whose file is gone.

    Args:
        index_dir: an existing index.
        paths: image files or folders to remove; ones matching nothing are reported as skipped.
        missing: also remove items whose file no longer exists.
    """
    started = time.perf_counter()
    with _locked_index(index_dir):
        return _remove(index_dir, paths, missing, started)


def _remove(index_dir, paths, missing: bool, started: float) -> IndexSummary:
    index = ImageIndex.load(index_dir)
    item_paths = index.items.paths
    doomed: set[int] = set()
    skipped = []
    for given in paths or ():
        target = os.path.abspath(given)
        inside = target.rstrip(os.sep) + os.sep
        matches = {row for row, path in enumerate(item_paths) if path == target or path.startswith(inside)}
        if not matches:
            skipped.append(SkippedFile(target, "not in the index"))
        doomed |= matches
    if missing:
        doomed |= {row for row, path in enumerate(item_paths) if not os.path.exists(path)}
    if not doomed:
        return _summary(index, index_dir, started, skipped=skipped, written=False)
    removed_paths = [item_paths[row] for row in sorted(doomed)]
    index.remove(sorted(doomed))
    path = index.save(index_dir, overwrite=True)
    return _summary(index, path, started, removed=len(doomed), skipped=skipped, removed_paths=removed_paths)


def rebuild_index(index_dir: Union[str, Path], config: Optional[IndexConfig] = None) -> IndexSummary:
    """Retrain and refill the index's search structure from its stored embeddings (no image is re-embedded).

    Args:
        index_dir: an existing index.
        config: new index settings (kind, ANN parameters); default: the index's own. The dtype cannot change here.
    """
    started = time.perf_counter()
    with _locked_index(index_dir):
        index = ImageIndex.load(index_dir)
        if config is not None:
            if config.dtype != index.dtype:
                raise IndexConfigError(f"rebuild keeps the index dtype ({index.dtype}); build anew for {config.dtype}")
            index.config = config
        index.rebuild()
        path = index.save(index_dir, overwrite=True)
        return _summary(index, path, started)


def _locked_index(index_dir):
    """The writer lock of an existing index: a second `add`/`remove` waits and then reads the first one's result,
    so no update is lost and ids stay unique. A missing index is an error before any lock file is made."""
    read_manifest(readable_path(Path(index_dir).absolute()))
    return writer_lock(index_dir)


def _summary(index: ImageIndex, path, started: float, **counts) -> IndexSummary:
    return IndexSummary(
        index_dir=Path(path).absolute(),
        count=len(index),
        kind=index.kind.value,
        dtype=index.dtype,
        dim=index.dim,
        seconds=time.perf_counter() - started,
        rebuild_due=index.rebuild_due,
        **counts,
    )
