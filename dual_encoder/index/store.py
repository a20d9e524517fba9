"""The image index: embeddings + item table + optional FAISS structure; add, remove, search, save, load.

On disk (one directory): `embeddings.npy` (L2-normalised, float32 or float16, memory-mapped on load),
`items.jsonl`, `ann.faiss` for approximate kinds, and `manifest.json` with counts, parameters, the
model fingerprint and the sha256 of every file. Saving writes a complete sibling directory first and
then renames it into place, so a crash at any moment leaves the previous index loadable.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dual_encoder import atomic, files
from dual_encoder.atomic import INDEX, atomic_directory, file_sha256, readable_path
from dual_encoder.config import IndexConfig
from dual_encoder.index.ann import AnnIndex, IndexKind, resolve_kind
from dual_encoder.index.errors import (
    ImageIndexError,
    IndexConfigError,
    IndexCorruptError,
    IndexNotFoundError,
    QueryError,
)
from dual_encoder.index.items import ImageRecord, ItemTable
from dual_encoder.index.topk import exact_search

FORMAT = "dual_encoder.image_index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
ITEMS = "items.jsonl"
ANN = "ann.faiss"
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The model an index was embedded with.

    Args:
        directory: the model directory (absolute path as given at build time).
        fingerprint: `model_fingerprint(directory)` at build time.
    """

    directory: str
    fingerprint: str


class ImageIndex:
    """Normalised image embeddings with their item table, searchable by inner product.

    Args:
        embeddings: `[N, D]` array in the index dtype (a `np.memmap` when loaded from disk).
        items: the item table, row `i` describing embedding row `i`.
        config: dtype, kind and ANN parameters.
        model: the model the embeddings came from.
        next_id: the id the next added item gets (ids are never reused).
        ann: the FAISS structure for approximate kinds (built here when None and needed).

    Example:
        >>> index = ImageIndex.create(np.eye(3, 4), records, IndexConfig(), ModelRecord("m", "abc"))
        >>> rows, scores = index.search(np.eye(1, 4), k=2)
        >>> index.save("gallery.index"); ImageIndex.load("gallery.index")
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        items: ItemTable,
        config: IndexConfig,
        model: ModelRecord,
        next_id: int,
        ann: Optional[AnnIndex] = None,
    ):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
            raise ImageIndexError(f"{embeddings.shape[0]} embeddings for {len(items)} items")
        self._embeddings = embeddings
        self.items = items
        self.config = config
        self.model = model
        self.next_id = next_id
        self.kind = resolve_kind(config, len(items))
        self._ann = ann if ann is not None else self._build_ann()

    @classmethod
    def create(
        cls, embeddings: np.ndarray, records: Sequence[ImageRecord], config: IndexConfig, model: ModelRecord
    ) -> "ImageIndex":
        """A new index over `records` and their embeddings (normalised and cast here)."""
        items = ItemTable.from_records(records, first_id=0)
        return cls(_prepare(embeddings, config), items, config, model, next_id=len(items))

    # -- properties ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.items)

    @property
    def embeddings(self) -> np.ndarray:
        return self._embeddings

    @property
    def dim(self) -> int:
        return int(self._embeddings.shape[1])

    @property
    def dtype(self) -> str:
        return self.config.dtype

    @property
    def ann_params(self) -> dict[str, Any]:
        return dict(self._ann.params) if self._ann is not None else {}

    # -- search -------------------------------------------------------------------------------

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` rows for each query by inner product, best first.

        Args:
            query_embeddings: `[Q, D]` (or `[D]`) query embeddings.
            k: results per query, a positive integer; clamped to the gallery size.

        Returns:
            `(rows, scores)`, `[Q, min(k, N)]` each. `self.items[row]` describes a row; an
            approximate index marks missing results with row -1.
        """
        queries = np.asarray(query_embeddings, dtype=np.float32)
        queries = queries[None] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise QueryError(f"query embeddings have shape {queries.shape}, expected [Q, {self.dim}]")
        k = validate_k(k)
        if len(self) == 0:
            return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
        k = min(k, len(self))
        if self._ann is not None:
            return self._ann.search(queries, k, self._embeddings, self.items.ids)
        return exact_search(self._embeddings, queries, k)

    # -- changes ------------------------------------------------------------------------------

    def add(self, records: Sequence[ImageRecord], embeddings: np.ndarray) -> None:
        """Append items; they get new ids. An approximate structure grows in place when it can."""
        new_items = ItemTable.from_records(records, first_id=self.next_id)
        new_embeddings = _prepare(embeddings, self.config)
        if new_embeddings.shape[1] != self.dim or len(new_embeddings) != len(new_items):
            raise ImageIndexError(
                f"cannot add {new_embeddings.shape[0]} embeddings of dimension {new_embeddings.shape[1]} "
                f"for {len(new_items)} items to a {self.dim}-d index"
            )
        self._embeddings = np.concatenate([self._embeddings, new_embeddings])
        self.items = self.items.concat(new_items)
        self.next_id += len(new_items)
        kind = resolve_kind(self.config, len(self))
        if kind == self.kind and self._ann is not None:
            self._ann.add(new_embeddings, new_items.ids)
        else:
            self.kind = kind
            self._ann = self._build_ann()

    def remove(self, rows: Sequence[int]) -> None:
        """Drop the given rows. A structure labelled by item id (`ivfpq`) drops their vectors in place; the others
        are rebuilt (their labels are rows, which shift)."""
        if len(rows) == 0:
            return
        removed_ids = self.items.ids[np.unique(np.asarray(rows, dtype=np.int64))]
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(rows, dtype=np.int64))
        self._embeddings = np.ascontiguousarray(self._embeddings[keep])
        self.items = self.items.take(keep)
        kind = resolve_kind(self.config, len(self))
        if kind == self.kind and self._ann is not None and self._ann.labels_are_ids and len(self):
            self._ann.remove_ids(removed_ids)
        else:
            self.kind = kind
            self._ann = self._build_ann()

    def rebuild(self) -> None:
        """Train and fill the approximate structure afresh from the stored embeddings (no image is re-embedded)."""
        self.kind = resolve_kind(self.config, len(self))
        self._ann = self._build_ann()

    @property
    def rebuild_due(self) -> bool:
        """Whether the trained structure has seen the gallery grow or shrink enough that `rebuild` is worth it."""
        return self._ann is not None and self._ann.rebuild_due

    def _build_ann(self) -> Optional[AnnIndex]:
        if self.kind == IndexKind.EXACT or len(self) == 0:
            return None
        return AnnIndex.build(self.kind, self._embeddings, self.config, ids=self.items.ids)

    # -- persistence --------------------------------------------------------------------------

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the index to `directory` atomically; returns the path. An existing index there is replaced
        only with `overwrite` (and a folder that is not an index never is)."""
        target = Path(directory).absolute()
        with atomic_directory(target, INDEX, overwrite=overwrite, error=ImageIndexError) as staging:
            self._write(staging)
        return target

    def _write(self, directory: Path) -> None:
        with open(directory / EMBEDDINGS, "wb") as stream:
            np.save(stream, np.ascontiguousarray(self._embeddings))
        self.items.write_jsonl(directory / ITEMS)
        if self._ann is not None:
            self._ann.save(directory / ANN)
        names = [EMBEDDINGS, ITEMS] + ([ANN] if self._ann is not None else [])
        manifest = {
            **INDEX.stamp(),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": len(self),
            "dim": self.dim,
            "dtype": self.dtype,
            "kind": self.kind.value,
            "ann": self.ann_params,
            "config": dataclasses.asdict(self.config),
            "model": {"dir": self.model.directory, "fingerprint": self.model.fingerprint},
            "next_id": self.next_id,
            "files": {name: _describe_file(directory / name) for name in names},
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        # The manifest goes last: a directory with a manifest is complete.
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for name in names + [MANIFEST]:
            atomic.fsync(directory / name)
        atomic.fsync(directory)

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> "ImageIndex":
        """Open a saved index; embeddings are memory-mapped, not read (and so is an `ivfpq` structure, copied into
        memory only if it is changed).

        Args:
            directory: the index directory.
            verify: check the sha256 of every file (sizes, shapes and counts are always checked).

        Raises:
            IndexNotFoundError: no index at `directory`.
            IndexCorruptError: a file is missing, truncated, altered or inconsistent (the message names it).
        """
        source = readable_path(Path(directory).absolute())
        manifest = read_manifest(source)
        for name, expected in manifest["files"].items():
            _check_file(source / name, expected, verify)
        try:
            return cls._from_files(source, manifest)
        except ImageIndexError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:  # hand-edited values of the wrong shape
            raise IndexCorruptError(f"{source / MANIFEST}: malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def _from_files(cls, source: Path, manifest: dict[str, Any]) -> "ImageIndex":
        embeddings_path = source / EMBEDDINGS
        try:
            embeddings = np.load(embeddings_path, mmap_mode="r")
        except ValueError as error:
            raise IndexCorruptError(f"{embeddings_path}: not a readable .npy file ({error})") from None
        expected_shape = (manifest["count"], manifest["dim"])
        if embeddings.shape != expected_shape or embeddings.dtype != DTYPES[manifest["dtype"]]:
            raise IndexCorruptError(
                f"{embeddings_path}: holds {embeddings.dtype}{list(embeddings.shape)}, "
                f"manifest says {manifest['dtype']}{list(expected_shape)}"
            )
        items = ItemTable.read_jsonl(source / ITEMS, manifest["count"])
        try:
            config = IndexConfig(**manifest["config"])
            kind = IndexKind(manifest["kind"])
        except (TypeError, ValueError) as error:
            raise IndexCorruptError(f"{source / MANIFEST}: bad config or kind ({error})") from None
        ann = AnnIndex.load(kind, source / ANN, manifest["ann"], mmap=True) if ANN in manifest["files"] else None
        model = ModelRecord(manifest["model"]["dir"], manifest["model"]["fingerprint"])
        index = cls(embeddings, items, config, model, manifest["next_id"], ann=ann)
        if index.kind != kind:
            raise IndexCorruptError(f"{source / MANIFEST}: kind '{kind.value}' does not match its config")
        return index


def validate_k(k: Any) -> int:
    """`k` as an int, or a `QueryError` for zero, negative or non-integer values."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError(f"k must be a positive integer, got {k!r}")
    if k <= 0:
        raise QueryError(f"k must be a positive integer, got {k}")
    return int(k)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed `manifest.json` of an index directory (not its data files)."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise IndexNotFoundError(f"no index at {directory}: directory does not exist")
    if not path.is_file():
        raise IndexCorruptError(f"{path}: missing (not an index directory, or an unfinished write)")
    try:
        manifest = json.loads(files.read_bytes(path, files.MAX_TEXT_BYTES).decode("utf-8"))
    except (OSError, ValueError) as error:
        raise IndexCorruptError(f"{path}: unreadable ({error})") from None
    required = {"format_version", "count", "dim", "dtype", "kind", "ann", "config", "model", "next_id", "files"}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or required - set(manifest):
        raise IndexCorruptError(f"{path}: not a {FORMAT} manifest")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path}: format version {version!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    if manifest["dtype"] not in DTYPES:
        raise IndexCorruptError(f"{path}: unknown dtype '{manifest['dtype']}'")
    _check_listed_files(path, manifest)
    return manifest


def _check_listed_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the index needs is listed with a size and checksum, and nothing else is listed.

    A hand-edited `files: {}` would otherwise load unverified, and a listed `../../etc/passwd` would be
    opened outside the index folder.
    """
    listed = manifest["files"]
    if not isinstance(listed, dict):
        raise IndexCorruptError(f"{path}: 'files' is not an object")
    expected = {EMBEDDINGS, ITEMS} | ({ANN} if manifest["kind"] != IndexKind.EXACT.value else set())
    unknown = sorted(name for name in listed if name not in (EMBEDDINGS, ITEMS, ANN))
    if unknown:
        raise IndexCorruptError(f"{path}: lists files that are not part of an index: {unknown[:3]}")
    missing = sorted(expected - set(listed))
    if missing:
        raise IndexCorruptError(f"{path}: does not list {missing} (every file must be listed and verified)")
    for name, entry in listed.items():
        valid = (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
        )
        if not valid:
            raise IndexCorruptError(f"{path}: entry for {name} needs 'sha256' (text) and 'bytes' (integer)")


def _prepare(embeddings: np.ndarray, config: IndexConfig) -> np.ndarray:
    """L2-normalise in float32, then store in the configured dtype."""
    if config.dtype not in DTYPES:
        raise IndexConfigError(f"unknown index dtype '{config.dtype}'; choose one of {sorted(DTYPES)}")
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:
        raise ImageIndexError(f"embeddings must be a [N, D] matrix, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(DTYPES[config.dtype])


def _describe_file(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _check_file(path: Path, expected: dict[str, Any], verify: bool) -> None:
    try:
        size = files.check_regular(path).st_size
        if size != expected["bytes"]:
            raise IndexCorruptError(f"{path}: {size} bytes, manifest says {expected['bytes']} (truncated or altered)")
        if verify and file_sha256(path) != expected["sha256"]:
            raise IndexCorruptError(f"{path}: sha256 differs from the manifest (file altered)")
    except files.FileRefusedError as refused:
        raise IndexCorruptError(f"{path}: {refused}") from None


def check_replaceable(target: Path, overwrite: bool = False) -> None:
    """Only an index (with `overwrite`), nothing, or an empty folder may be replaced: never a user's folder."""
    atomic.check_replaceable(target, INDEX, overwrite=overwrite, error=ImageIndexError)
