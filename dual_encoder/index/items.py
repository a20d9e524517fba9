"""The item table of an index: one row per embedding (id, path, size, mtime, content hash, caption)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from dual_encoder.index.errors import IndexCorruptError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """One gallery image as found on disk, before the index gives it an id.

    Args:
        path: where the image is read from (absolute for folders and list files).
        sha256: hex digest of the file's bytes; equal content means an equal embedding.
        size: file size in bytes, if the file exists.
        mtime: modification time (seconds since the epoch), if the file exists.
        caption: the dataset caption, if the image came from a captioned split.
    """

    path: str
    sha256: str
    size: Optional[int] = None
    mtime: Optional[float] = None
    caption: Optional[str] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Item(ImageRecord):
    """An indexed image. `id` is stable: it survives adds and removes and is never reused.

    Args:
        id: the item id, unique within its index.
    """

    id: int


class ItemTable:
    """Column-wise item table, row `i` describing embedding row `i`.

    Columns rather than one object per item keep a million-item table at ~200 bytes per item.
    Ids increase with the row, so an id is found by binary search.

    Args:
        ids: int64 item ids, increasing.
        paths: image paths.
        sha256: hex content digests.
        sizes: file sizes, -1 where unknown.
        mtimes: modification times, NaN where unknown.
        captions: captions or None.
    """

    def __init__(
        self,
        ids: np.ndarray,
        paths: list[str],
        sha256: np.ndarray,
        sizes: np.ndarray,
        mtimes: np.ndarray,
        captions: list[Optional[str]],
    ):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.paths = list(paths)
        self.sha256 = np.asarray(sha256, dtype="S64")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.mtimes = np.asarray(mtimes, dtype=np.float64)
        self.captions = list(captions)

    @classmethod
    def from_records(cls, records: Sequence[ImageRecord], first_id: int) -> "ItemTable":
        """A table of `records` with ids `first_id, first_id + 1, ...`."""
        return cls(
            ids=np.arange(first_id, first_id + len(records), dtype=np.int64),
            paths=[r.path for r in records],
            sha256=np.array([r.sha256.encode("ascii") for r in records], dtype="S64"),
            sizes=np.array([-1 if r.size is None else r.size for r in records], dtype=np.int64),
            mtimes=np.array([math.nan if r.mtime is None else r.mtime for r in records], dtype=np.float64),
            captions=[r.caption for r in records],
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> Item:
        size, mtime = int(self.sizes[row]), float(self.mtimes[row])
        return Item(
            id=int(self.ids[row]),
            path=self.paths[row],
            sha256=self.sha256[row].decode("ascii"),
            size=None if size < 0 else size,
            mtime=None if math.isnan(mtime) else mtime,
            caption=self.captions[row],
        )

    def __iter__(self) -> Iterator[Item]:
        return (self[row] for row in range(len(self)))

    def row_of(self, item_id: int) -> Optional[int]:
        """The row of `item_id`, or None if the table has no such id."""
        row = int(np.searchsorted(self.ids, item_id))
        return row if row < len(self.ids) and self.ids[row] == item_id else None

    def take(self, rows: np.ndarray) -> "ItemTable":
        """The table restricted to `rows` (increasing), keeping ids."""
        rows = np.asarray(rows, dtype=np.int64)
        return ItemTable(
            ids=self.ids[rows],
            paths=[self.paths[r] for r in rows],
            sha256=self.sha256[rows],
            sizes=self.sizes[rows],
            mtimes=self.mtimes[rows],
            captions=[self.captions[r] for r in rows],
        )

    def concat(self, other: "ItemTable") -> "ItemTable":
        return ItemTable(
            ids=np.concatenate([self.ids, other.ids]),
            paths=self.paths + other.paths,
            sha256=np.concatenate([self.sha256, other.sha256]),
            sizes=np.concatenate([self.sizes, other.sizes]),
            mtimes=np.concatenate([self.mtimes, other.mtimes]),
            captions=self.captions + other.captions,
        )

    def write_jsonl(self, path: str | Path) -> None:
        """One JSON object per line, in row order."""
        with open(path, "w", encoding="utf-8") as stream:
            for item in self:
                stream.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")

    @classmethod
    def read_jsonl(cls, path: str | Path, count: int) -> "ItemTable":
        """Read a table written by `write_jsonl`; `count` is the number of items the manifest promises."""
        # Numeric columns fill preallocated arrays: a million transient Python ints and bytes would
        # otherwise stay in the process's resident memory after parsing.
        ids, sizes = np.empty(count, np.int64), np.empty(count, np.int64)
        mtimes, sha256 = np.empty(count, np.float64), np.empty(count, "S64")
        paths: list[str] = []
        captions: list[Optional[str]] = []
        with open(path, encoding="utf-8") as stream:
            for row, line in enumerate(stream):
                if row >= count:
                    raise IndexCorruptError(f"{path}: more than the {count} items the manifest lists")
                try:
                    item = json.loads(line)
                    ids[row] = item["id"]
                    sha256[row] = item["sha256"].encode("ascii")
                    sizes[row] = -1 if item["size"] is None else item["size"]
                    mtimes[row] = math.nan if item["mtime"] is None else item["mtime"]
                    paths.append(str(item["path"]))
                    captions.append(item["caption"])
                except (ValueError, KeyError, TypeError, AttributeError) as error:
                    raise IndexCorruptError(f"{path}:{row + 1}: not a valid item ({error})") from None
        if len(paths) != count:
            raise IndexCorruptError(f"{path}: {len(paths)} items, the manifest lists {count}")
        if np.any(np.diff(ids) <= 0):
            raise IndexCorruptError(f"{path}: item ids are not increasing")
        return cls(ids, paths, sha256, sizes, mtimes, captions)
