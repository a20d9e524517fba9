"""Write a directory atomically: build it in a staging folder beside the target, then swap it into place.

A directory cannot be renamed over a non-empty one, so replacing takes two renames: target -> backup,
staging -> target. A kill between them leaves only the complete backup, which `recover` (run by the next
write, and by readers through `readable_path`) puts back; a kill before them leaves the target untouched and
a staging folder that the next write removes. Datasets, models, feature caches, indexes and exports all
use this one mechanism, and `file_sha256` for the checksums their manifests record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Type

from dual_encoder import files
from dual_encoder.errors import DualEncoderError


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, marker: str, what: str, error: Type[Exception] = DualEncoderError
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends it replaces `target`; if the block raises it is removed.

    Only nothing, an empty folder or a previous artifact (a folder holding `marker`) is replaced, never a
    user's folder: that raises `error` saying `target` is not `what`.
    """
    target = Path(target).absolute()
    recover(target)
    check_replaceable(target, marker=marker, what=what, error=error)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, os.getpid()), dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        fsync(staging)
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(target: Path, *, marker: str, what: str, error: Type[Exception] = DualEncoderError) -> None:
    """Raise `error` unless `target` is absent, an empty folder, or a folder holding `marker`."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise error(f"{target} exists and is not a directory: not replacing it")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise error(f"{target} is a non-empty directory that is not {what}: not replacing it")


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
