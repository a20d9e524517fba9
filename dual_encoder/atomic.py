"""Write a directory atomically: build it in a staging folder beside the target, then swap it into place.

Every artifact a command writes has a `Kind`: its marker file names it (`"artifact": "dual_encoder.index"`),
so a command replaces only an artifact of its own kind, and only when asked (`overwrite`); never a folder of
another kind or one that is not ours. A writer holds `writer_lock(target)` — an advisory `filelock` lock in
a file beside the target, so it survives the swap — for its whole read-modify-write; readers take no lock.

A directory cannot be renamed over a non-empty one, so replacing takes two renames: target -> backup,
staging -> target. A kill between them leaves only the complete backup, which `recover` (run by the next
write, and by readers through `readable_path`) puts back; a kill before them leaves the target untouched and
a staging folder that the next write removes. Datasets, models, feature caches, indexes and exports all
use this one mechanism, and `file_sha256` for the checksums their manifests record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Type

import filelock

from dual_encoder import files
from dual_encoder.errors import DualEncoderError

ARTIFACT_KEY = "artifact"
LOCK_TIMEOUT_ENV = "DUAL_ENCODER_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0  # seconds a second writer waits for the first before giving up
_MAX_MARKER_BYTES = 64 << 20


class OutputError(DualEncoderError):
    """An output cannot be written: the disk is full, the path is not writable, or it lies under a file."""


class LockTimeoutError(DualEncoderError):
    """Another process kept writing the same artifact for longer than the lock timeout."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of artifact: the marker file that names it, and how today's markers without a name look.

    Args:
        name: the value of `"artifact"` in the marker, e.g. `dual_encoder.index`.
        marker: the JSON file (or, for a binary marker, the file) whose presence completes the artifact.
        what: the kind in words, for messages ("an index").
        legacy_marker: the file that identifies one written before markers named their kind (default `marker`).
        legacy_keys: keys such an old marker always holds: they prove the folder ours when the name is absent.
        legacy_format: the value of its `format` key, where it has one.
        members: name patterns of everything the artifact holds at its top level; a folder with anything else
            in it is not replaced (a user's file beside our manifest would go with it). Empty: not checked.
    """

    name: str
    marker: str
    what: str
    legacy_marker: Optional[str] = None
    legacy_keys: frozenset = frozenset()
    legacy_format: Optional[str] = None
    members: tuple[str, ...] = ()

    def strangers(self, folder: Path) -> list[str]:
        """Entries of `folder` that are not part of an artifact of this kind."""
        if not self.members:
            return []
        names = sorted(entry.name for entry in folder.iterdir())
        return [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.members)]

    def stamp(self) -> dict[str, str]:
        """The entry a writer puts in its marker so this kind is recognised later."""
        return {ARTIFACT_KEY: self.name}


INDEX = Kind(
    "dual_encoder.index", "manifest.json", "an index", legacy_format="dual_encoder.image_index",
    legacy_keys=frozenset({"format", "format_version", "count", "dim", "files", "next_id", "model"}),
    members=("manifest.json", "embeddings.npy", "items.jsonl", "ann.faiss"),
)  # fmt: skip
PREPARED_DATASET = Kind(
    "dual_encoder.prepared_dataset", "manifest.json", "a prepared dataset",
    legacy_keys=frozenset({"format_version", "fingerprint", "source", "counts", "splits"}),
    members=("manifest.json", "*.tfrecord", "*.jsonl", "features"),
)  # fmt: skip
EXPORT = Kind(
    "dual_encoder.export", "export.json", "an export",
    legacy_keys=frozenset({"model", "signatures", "image_size", "sequence_length"}),
    members=("export.json", "text_encoder", "image_encoder", "searcher"),
)  # fmt: skip
RUN = Kind(
    "dual_encoder.run", "run.json", "a training run folder", legacy_marker="config.json",
    legacy_keys=frozenset({"data", "model", "train", "index", "serve"}),
)  # fmt: skip
MODEL = Kind(
    "dual_encoder.model", "fingerprint.json", "a saved model", legacy_keys=frozenset({"sha256"}),
    members=("fingerprint.json", "config.json", "model.weights.h5", "vocabulary.json", "assets"),
)  # fmt: skip
FEATURE_CACHE = Kind("dual_encoder.feature_cache", "features.npz", "a feature cache", members=("features.npz",))
KINDS = (INDEX, PREPARED_DATASET, EXPORT, RUN, MODEL, FEATURE_CACHE)


def identify(folder: str | Path) -> Optional[Kind]:
    """The kind of artifact `folder` holds, or None when it is not one of ours.

    A marker naming its kind decides; otherwise a marker written before kinds were named counts when it
    holds every key that kind's marker always held (a folder merely holding some `manifest.json` does not).
    """
    folder = Path(folder)
    for kind in KINDS:
        content = _read_marker(folder / kind.marker)
        if isinstance(content, dict) and content.get(ARTIFACT_KEY) == kind.name:
            return kind
    for kind in KINDS:
        path = folder / (kind.legacy_marker or kind.marker)
        if not path.suffix == ".json":
            if path.is_file():
                return kind
            continue
        content = _read_marker(path)
        if not isinstance(content, dict) or ARTIFACT_KEY in content or not kind.legacy_keys <= set(content):
            continue
        if kind.legacy_format is None or content.get("format") == kind.legacy_format:
            return kind
    return None


def _read_marker(path: Path) -> Any:
    """A marker's parsed JSON, or None (missing, not a regular file, too large, not JSON)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, kind: Kind, *, overwrite: bool = False, error: Type[Exception] = DualEncoderError
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends it replaces `target`; if the block raises it is removed.

    Only nothing, an empty folder or (with `overwrite`) an artifact of the same `kind` is replaced; see
    `check_replaceable`. A write the file system refuses (full, read-only, under a file) raises `OutputError`.
    """
    target = Path(target).absolute()
    recover(target)
    check_replaceable(target, kind, overwrite=overwrite, error=error)
    with writing(target, every_error=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, os.getpid()), dir=target.parent))
    with writing(target):
        try:
            yield staging
            os.chmod(staging, 0o755)  # mkdtemp makes it private
            fsync(staging)
            _swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(
    target: str | Path, kind: Kind, *, overwrite: bool = False, error: Type[Exception] = DualEncoderError
) -> None:
    """Raise `error` unless `target` is absent, an empty folder, or (with `overwrite`) an artifact of `kind`.

    A folder of another kind, or one that is not ours, is refused even with `overwrite`: nothing a command
    did not write itself is ever deleted.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise error(f"{target} exists and is not a directory: not replacing it")
    if not target.is_dir() or not any(target.iterdir()):
        return
    found = identify(target)
    if found is None:
        raise error(f"{target} is a non-empty directory that is not {kind.what}: not replacing it")
    if found != kind:
        raise error(f"{target} is {found.what}, not {kind.what}: not replacing it")
    strangers = kind.strangers(target)
    if strangers:
        shown = ", ".join(strangers[:3]) + (", …" if len(strangers) > 3 else "")
        raise error(f"{target} holds {kind.what} and files that are not part of it ({shown}): not replacing it")
    if not overwrite:
        raise error(f"{target} already holds {kind.what}: pass --overwrite to replace it")


@contextlib.contextmanager
def writer_lock(target: str | Path, *, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the advisory lock of `target` for a whole read-modify-write, so two writers never lose an update.

    The lock file is `.<name>.lock` beside `target` (not inside it: the swap replaces the folder). A second
    writer waits up to `timeout` seconds (default `$DUAL_ENCODER_LOCK_TIMEOUT`, else 600), saying so once,
    then raises `LockTimeoutError`. Readers never take it.
    """
    target = Path(target).absolute()
    timeout = lock_timeout() if timeout is None else timeout
    path = target.parent / f".{target.name}.lock"
    with writing(target, every_error=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"waiting for another process writing {target} (up to {timeout:g} s)", file=sys.stderr)
            try:
                lock.acquire(timeout=timeout)
            except filelock.Timeout:
                raise LockTimeoutError(
                    f"{target} is being written by another process (lock {path} held for over {timeout:g} s): "
                    "try again when it finishes"
                ) from None
    try:
        yield
    finally:
        lock.release()


def lock_timeout() -> float:
    """Seconds a writer waits for another writer of the same artifact (`$DUAL_ENCODER_LOCK_TIMEOUT`)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        raise DualEncoderError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise DualEncoderError(f"{LOCK_TIMEOUT_ENV}={raw!r} must be >= 0 seconds")
    return value


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.ENOTDIR}


@contextlib.contextmanager
def writing(target: str | Path, *, every_error: bool = False) -> Iterator[None]:
    """Turn the file system refusing a write under `target` (full disk, read-only, a file in the way) into a
    one-line `OutputError` naming the output. Around code that only creates the output's folders and files,
    `every_error`; around code that also reads inputs, only errors that mean "cannot write" are turned."""
    try:
        yield
    except OSError as error:
        if isinstance(error, DualEncoderError) or not (every_error or error.errno in _WRITE_ERRNOS):
            raise
        raise OutputError(f"cannot write {target}: {error.strerror}") from None


def recover(target: str | Path) -> None:
    """Finish a swap that was killed between its two renames (only the complete backup is left)."""
    target, backup = Path(target), _backup_of(Path(target))
    if not target.exists() and backup.is_dir():
        os.rename(backup, target)


def readable_path(target: str | Path) -> Path:
    """Where a reader finds the artifact: the target, or its backup while a killed swap is unfinished."""
    target, backup = Path(target), _backup_of(Path(target))
    return backup if not target.exists() and backup.is_dir() else target


def write_file_atomically(path: str | Path, text: str) -> None:
    """Replace a small text file so that a reader sees the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _backup_of(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _staging_prefix(target: Path, pid: int) -> str:
    return f".{target.name}.tmp-{pid}-"


def _swap_into_place(staging: Path, target: Path) -> None:
    backup = _backup_of(target)
    if target.exists():
        shutil.rmtree(backup, ignore_errors=True)  # a finished swap's leftover: the target is complete
        os.rename(target, backup)
        os.rename(staging, target)
        fsync(target.parent)
        shutil.rmtree(backup)
    else:
        os.rename(staging, target)
    fsync(target.parent)


def _remove_abandoned_staging(target: Path) -> None:
    """Delete staging folders whose writer process is gone (killed mid-write)."""
    prefix = f".{target.name}.tmp-"
    for staging in target.parent.glob(f"{prefix}*-*"):
        pid = staging.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a regular file's bytes, read in 1 MiB blocks.

    A FIFO or device put in an artifact's place is refused (`files.FileRefusedError`, an `OSError`), not hashed
    forever.
    """
    return files.sha256(path)
