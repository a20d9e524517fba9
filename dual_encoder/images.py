"""Photos decoded as people see them: the one home of Pillow image decoding for prepare, index, thumbnails and
contact sheets.

EXIF orientation is applied (a phone's portrait photo is stored landscape with a tag saying "rotate me"), every
format Pillow reads is read (JPEG, PNG, GIF, BMP, WebP, TIFF; HEIC/HEIF with the optional `pillow-heif`,
registered in `dual_encoder.files`), the decompression-bomb limit is checked from the header first, and the
result is 8-bit RGB. TensorFlow's decoders ignore EXIF orientation and cannot read TIFF or HEIC, so images go to
TensorFlow as `tf_readable` bytes. Failures are `files.FileRefusedError`s with a countable reason.
"""

from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from dual_encoder import files

# File names that image folders are searched for (prepare's folder source, index build/add).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
)
# The formats `decode` reads, in words (for messages).
READABLE_FORMATS = "JPEG, PNG, GIF, BMP, WebP, TIFF" + (", HEIC" if files.HEIF_SUPPORTED else "")
EXIF_ORIENTATION = 0x0112
_PNG_BIT_DEPTH, _PNG_COLOUR_TYPE = 24, 25  # byte offsets in the IHDR chunk, which always comes first
_PNG_GREY, _PNG_RGB = 0, 2


def _png_is_plain(image: Image.Image, data: bytes) -> bool:
    plain_pixels = data[_PNG_BIT_DEPTH] == 8 and data[_PNG_COLOUR_TYPE] in (_PNG_GREY, _PNG_RGB)
    return plain_pixels and "transparency" not in image.info


# Pillow format -> (the format name `tf_readable` reports, whether TF's decoder gives the same RGB pixels from
# these bytes).
_TF_FORMATS: dict[str, tuple[str, Callable[[Image.Image, bytes], bool]]] = {
    "JPEG": ("jpeg", lambda image, data: image.mode in ("RGB", "L")),  # not CMYK/YCCK
    "MPO": ("jpeg", lambda image, data: image.mode in ("RGB", "L")),  # many cameras' JPEGs; TF reads frame 0
    "PNG": ("png", _png_is_plain),  # not 16-bit, palette or alpha
    "GIF": ("gif", lambda image, data: "transparency" not in image.info),
    "BMP": ("bmp", lambda image, data: image.mode == "RGB"),  # 24/32-bit; TF cannot read palette or RLE BMPs
}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit integer modes rescaled (Pillow's own convert clips them), alpha composited on white."""
    if image.mode.startswith("I"):
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def is_upright(image: Image.Image) -> bool:
    """Whether the image's EXIF says it is stored the way it is viewed (no tag, or orientation 1)."""
    return image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1)


def _loaded(data: bytes, max_pixels: int, draft: Optional[tuple[int, int]]) -> Image.Image:
    image = files.open_image(data, max_pixels)  # the header's pixel check, before any decoder runs
    try:
        if draft is not None:
            image.draft("RGB", draft)  # JPEG decoders can downscale while decoding: much faster for thumbnails
        image.load()
        return image
    except Image.DecompressionBombError as error:  # Pillow's own guard, should max_pixels exceed it
        raise files.FileRefusedError(files.Refused.TOO_LARGE, str(error)) from None
    except Exception as error:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, …)
        raise files.FileRefusedError(files.Refused.CORRUPT, f"{type(error).__name__}: {error}") from None


def _upright_rgb(image: Image.Image) -> Image.Image:
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as error:  # a malformed EXIF block
        raise files.FileRefusedError(files.Refused.CORRUPT, f"{type(error).__name__}: {error}") from None


def decode(data: bytes, max_pixels: int, draft: Optional[tuple[int, int]] = None) -> Image.Image:
    """Encoded image `data` as an upright 8-bit RGB Pillow image, as a photo viewer shows it.

    Args:
        data: the bytes of an image file in any format Pillow reads.
        max_pixels: refuse (`Refused.TOO_LARGE`) an image whose header declares more pixels.
        draft: for thumbnails: let a JPEG decoder downscale while decoding to no less than this size.

    Raises:
        files.FileRefusedError: `not an image`, `corrupt` or `too large`, with a detail.
    """
    return _upright_rgb(_loaded(data, max_pixels, draft))


def tf_readable(data: bytes, max_pixels: int, compress_level: int = 6) -> tuple[bytes, str]:
    """Bytes that `tf.io.decode_image` decodes to the pixels `decode` gives, and their format.

    `data` itself when it is an upright JPEG, PNG, GIF or BMP whose pixels TensorFlow decodes as Pillow does;
    otherwise (EXIF-rotated, WebP, TIFF, HEIC, CMYK, 16-bit, alpha, palette …) a lossless RGB PNG of the upright
    pixels, written with zlib `compress_level` (0-9: lower is faster, larger). Raises like `decode`.
    """
    image = _loaded(data, max_pixels, None)
    kept = _TF_FORMATS.get(image.format)
    if kept is not None and is_upright(image) and kept[1](image, data):
        return data, kept[0]
    buffer = io.BytesIO()
    _upright_rgb(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue(), "png"
