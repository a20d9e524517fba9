"""The image index: build it from a gallery, keep it up to date, and search it (exact or FAISS)."""

import importlib

from dual_encoder.index.ann import IndexKind
from dual_encoder.index.errors import (
    AnnUnavailableError,
    GallerySourceError,
    ImageIndexError,
    IndexConfigError,
    IndexCorruptError,
    IndexNotFoundError,
    ModelMismatchError,
    QueryError,
    QueryImageError,
    UnknownItemError,
)
from dual_encoder.index.dedup import DedupReport, DuplicateGroup, find_duplicates
from dual_encoder.index.items import ImageRecord, Item, ItemTable
from dual_encoder.index.store import ImageIndex, ModelRecord
from dual_encoder.index.topk import exact_search

# Names whose modules import TensorFlow (~4 s): loaded on first use, so that opening and searching
# a saved index (store, topk, ann) needs only NumPy and FAISS.
_LAZY = {
    "IndexSummary": "dual_encoder.index.build",
    "add_to_index": "dual_encoder.index.build",
    "build_index": "dual_encoder.index.build",
    "rebuild_index": "dual_encoder.index.build",
    "remove_from_index": "dual_encoder.index.build",
    "sync_index": "dual_encoder.index.build",
    "DatasetSplit": "dual_encoder.index.embed",
    "ImageFolder": "dual_encoder.index.embed",
    "ImageList": "dual_encoder.index.embed",
    "SkippedFile": "dual_encoder.index.embed",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnnUnavailableError",
    "DedupReport",
    "DuplicateGroup",
    "GallerySourceError",
    "ImageIndex",
    "ImageIndexError",
    "ImageRecord",
    "IndexConfigError",
    "IndexCorruptError",
    "IndexKind",
    "IndexNotFoundError",
    "Item",
    "ItemTable",
    "ModelMismatchError",
    "ModelRecord",
    "QueryError",
    "QueryImageError",
    "UnknownItemError",
    "exact_search",
    "find_duplicates",
    *_LAZY,
]
