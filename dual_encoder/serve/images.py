"""Image files for the HTTP layer: read safely (`dual_encoder.files`), their real media type, thumbnails, and a
byte-bounded LRU cache of them."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import threading
from typing import Optional

from PIL import Image

from dual_encoder import files, images
from dual_encoder.config import DataConfig
from dual_encoder.errors import DualEncoderError

THUMBNAIL_FORMAT = "JPEG"
THUMBNAIL_MEDIA_TYPE = "image/jpeg"
_THUMBNAIL_QUALITY = 85


class UnreadableImageError(DualEncoderError):
    """An indexed image file is gone, is no longer a regular file, is too large, or cannot be decoded.

    Messages never name the file: they go to HTTP clients, who must not learn server paths.
    """


class ImageTimeoutError(UnreadableImageError):
    """Reading an indexed image file took longer than the server allows."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An image file's bytes as read now, their media type (from the bytes) and their sha256 (the ETag)."""

    data: bytes
    media_type: str
    sha256: str


def read_image_file(path: str, max_pixels: int = DataConfig.max_image_pixels) -> ImageFile:
    """Read an indexed image through `dual_encoder.files` (regular file, bounded size, header pixel check)."""
    try:
        data, image = files.read_image(path, max_pixels)
    except files.FileRefusedError as refused:
        raise UnreadableImageError(_message(refused)) from None
    media = Image.MIME.get(image.format, "application/octet-stream")
    return ImageFile(data, media, hashlib.sha256(data).hexdigest())


def media_type(path: str) -> str:
    """The media type of the image's actual format (its bytes, not its file name)."""
    return read_image_file(path).media_type


def make_thumbnail(path: str, size: int, max_pixels: int = DataConfig.max_image_pixels) -> bytes:
    """A JPEG of the image file at `path` that fits in `size` x `size` (see `thumbnail_of`)."""
    return thumbnail_of(read_image_file(path, max_pixels).data, size, max_pixels)


def thumbnail_of(data: bytes, size: int, max_pixels: int = DataConfig.max_image_pixels) -> bytes:
    """A JPEG of encoded image `data` that fits in `size` x `size`, upright as a photo viewer shows it (EXIF
    orientation applied; `images.decode`), aspect ratio kept; small images are not enlarged."""
    try:
        image = images.decode(data, max_pixels, draft=(size, size))
    except files.FileRefusedError as refused:
        raise UnreadableImageError(_message(refused)) from None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format=THUMBNAIL_FORMAT, quality=_THUMBNAIL_QUALITY, optimize=True)
    return buffer.getvalue()


def _message(refused: files.FileRefusedError) -> str:
    if refused.reason == files.Refused.MISSING:
        return "the image file of this item is missing"
    return f"the image file of this item cannot be read: {refused}"


class ByteLRUCache:
    """A thread-safe least-recently-used cache of byte strings, bounded by their total size.

    Args:
        max_bytes: evict the least recently used entries while the total exceeds this.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[object, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: object) -> Optional[bytes]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: object, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= len(previous)
            self._entries[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes
