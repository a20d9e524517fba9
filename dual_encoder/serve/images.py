"""Image files for the HTTP layer: their real media type, thumbnails, and a byte-bounded LRU cache of them."""

from __future__ import annotations

import collections
import contextlib
import io
import threading
from typing import Iterator, Optional

from PIL import Image

from dual_encoder.errors import DualEncoderError

THUMBNAIL_FORMAT = "JPEG"
THUMBNAIL_MEDIA_TYPE = "image/jpeg"
_THUMBNAIL_QUALITY = 85


class UnreadableImageError(DualEncoderError):
    """An indexed image file is gone or can no longer be decoded."""


@contextlib.contextmanager
def _open(path: str) -> Iterator[Image.Image]:
    """Open an image, turning every way it can fail into one `UnreadableImageError`."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise UnreadableImageError("the image file of this item is missing") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"the image file of this item cannot be read ({error})") from None


def media_type(path: str) -> str:
    """The media type of the image's actual format (its bytes, not its file name)."""
    with _open(path) as image:
        return Image.MIME.get(image.format, "application/octet-stream")


def make_thumbnail(path: str, size: int) -> bytes:
    """A JPEG that fits in `size` x `size`, aspect ratio kept; small images are not enlarged."""
    with _open(path) as image:
        # JPEG decoders can downscale while decoding: much faster for large photos.
        image.draft("RGB", (size, size))
        image.thumbnail((size, size))
        rgb = _flatten(image)
    buffer = io.BytesIO()
    rgb.save(buffer, format=THUMBNAIL_FORMAT, quality=_THUMBNAIL_QUALITY, optimize=True)
    return buffer.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    """RGB on a white background: JPEG has no alpha, and black is a poor default behind transparency."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


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
