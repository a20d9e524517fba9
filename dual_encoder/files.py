"""Reading users' files without hanging or running away: regular files only, bounded reads, odd names reported.

Every reader of user image files (prepare, index build/add, the server's image routes, `search --grid`) and
every checksum of a file goes through here. A path is `stat`ed before it is opened and opened with `O_NONBLOCK`,
so a FIFO, device or socket — also one swapped in between the two — is refused at once instead of blocking
or streaming forever; symlinks are followed, but only to regular files. Decoding what is read is
`dual_encoder.images`.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import BinaryIO, Optional, Union

from PIL import Image, UnidentifiedImageError

from dual_encoder.errors import DualEncoderError

try:  # HEIC/HEIF (iPhone photos) with the optional extra `heic`; Pillow alone cannot read them
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:
    HEIF_SUPPORTED = False
# ISO-BMFF `ftyp` brands of HEIF images, to say what is missing when pillow-heif is not installed.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
HEIF_MISSING = "HEIC/HEIF needs the optional pillow-heif: pip install 'dual_encoder[heic]'"

# The largest image file read into memory (a 64-megapixel photo is ~20-40 MB; RGB PNGs of it ~200 MB).
MAX_IMAGE_BYTES = 256 << 20
# The largest annotation / list file read as text (COCO 2017 train captions is ~90 MB).
MAX_TEXT_BYTES = 1 << 30
_BLOCK = 1 << 20


class Refused:
    """The short, countable reasons a user file is not read (also `sources.Reason` values where they overlap)."""

    MISSING = "missing"
    NOT_REGULAR = "not a regular file"
    TOO_LARGE = "too large"
    UNREADABLE = "unreadable"
    NOT_IMAGE = "not an image"
    CORRUPT = "corrupt"
    BAD_NAME = "file name is not valid UTF-8"


class FileRefusedError(DualEncoderError, OSError):
    """A user file that is not read, with a countable `reason` (see `Refused`) and a `detail` without its path.

    An `OSError` too, so callers that already skip unreadable files skip these the same way.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail


PathLike = Union[str, os.PathLike]


def check_regular(path: PathLike) -> os.stat_result:
    """The `stat` of `path` (symlinks followed) if it is a regular file, else `FileRefusedError`; opens nothing."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileRefusedError(Refused.MISSING) from None
    except OSError as error:
        raise FileRefusedError(Refused.UNREADABLE, error.strerror or type(error).__name__) from None
    if not stat.S_ISREG(info.st_mode):
        raise FileRefusedError(Refused.NOT_REGULAR, _kind(info.st_mode))
    return info


def open_regular(path: PathLike) -> BinaryIO:
    """`path` opened for binary reading, only if it is a regular file (checked before and after opening)."""
    check_regular(path)
    try:
        # O_NONBLOCK: a FIFO swapped in after the check opens at once instead of waiting for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileRefusedError(Refused.MISSING) from None
    except OSError as error:
        raise FileRefusedError(Refused.UNREADABLE, error.strerror or type(error).__name__) from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise FileRefusedError(Refused.NOT_REGULAR, _kind(mode))
    return os.fdopen(descriptor, "rb")


def read_bytes(path: PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (the limit also holds for a file that grows meanwhile)."""
    with open_regular(path) as stream:
        data = _read_at_most(stream, max_bytes)
    if len(data) > max_bytes:
        raise FileRefusedError(Refused.TOO_LARGE, f"more than {max_bytes} bytes")
    return data


def sha256(path: PathLike, max_bytes: Optional[int] = None) -> str:
    """Hex sha256 of a regular file's bytes, streamed in 1 MiB blocks; `FileRefusedError` past `max_bytes`."""
    digest, total = hashlib.sha256(), 0
    with open_regular(path) as stream:
        while block := stream.read(_BLOCK):
            total += len(block)
            if max_bytes is not None and total > max_bytes:
                raise FileRefusedError(Refused.TOO_LARGE, f"more than {max_bytes} bytes")
            digest.update(block)
    return digest.hexdigest()


def name_problem(path: PathLike) -> Optional[str]:
    """`Refused.BAD_NAME` if `path` cannot be written as UTF-8 (Python keeps such names as surrogates), else None.

    Such a name breaks every UTF-8 artifact it would be written to (TFRecords, item tables, JSON).
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return Refused.BAD_NAME
    return None


def printable(path: PathLike) -> str:
    """`path` for messages and reports: undecodable bytes shown as U+FFFD, never an encoding error."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """A Pillow image of `data` with only its header read, refused (`Refused.TOO_LARGE`) above `max_pixels`.

    The one decompression-bomb check: a tiny file can declare billions of pixels, so the header decides
    before any decoder (Pillow's or TensorFlow's) allocates them.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        heif = data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS
        raise FileRefusedError(Refused.NOT_IMAGE, HEIF_MISSING if heif and not HEIF_SUPPORTED else "") from None
    except Image.DecompressionBombError as error:  # Pillow's own guard, should max_pixels exceed it
        raise FileRefusedError(Refused.TOO_LARGE, str(error)) from None
    except Exception as error:  # a truncated or malformed header: Pillow raises many types
        raise FileRefusedError(Refused.CORRUPT, f"{type(error).__name__}: {error}") from None
    if image.width * image.height > max_pixels:
        raise FileRefusedError(Refused.TOO_LARGE, f"{image.width}x{image.height} pixels > {max_pixels}")
    return image


def read_image(path: PathLike, max_pixels: int, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes, Image.Image]:
    """A user image file's bytes and its header-only Pillow image, after every check above."""
    data = read_bytes(path, max_bytes)
    return data, open_image(data, max_pixels)


def _read_at_most(stream: BinaryIO, max_bytes: int) -> bytes:
    """Up to `max_bytes + 1` bytes: one byte more than allowed proves the file is too large."""
    chunks, remaining = [], max_bytes + 1
    while remaining > 0 and (block := stream.read(min(_BLOCK, remaining))):
        chunks.append(block)
        remaining -= len(block)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "an unusual file type"
