"""Image and annotation files the data tests make themselves (Pillow, a hand-written 16-bit PNG)."""

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from dual_encoder.config import DataConfig

# Tests prepare a handful of images: tiny shards so several shards get written.
TEST_CONFIG = DataConfig(validation_fraction=0.25, split_seed=0, shard_size=2, max_image_pixels=10_000)


def pattern(width: int = 24, height: int = 16, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with some structure (blocks), so JPEG keeps it recognisable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:height, :width]


def write_image(path: Path, pixels: np.ndarray, format: str, mode: str = "RGB", **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=format, **save_args)
    return path


def write_png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), from uint16 [H, W, 3]."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "image,caption") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(header + "\n")
        csv.writer(handle).writerows(rows)
    return path


def write_coco(path: Path, images: dict[int, str], annotations: list[tuple[int, str]]) -> Path:
    data = {
        "images": [{"id": image_id, "file_name": name} for image_id, name in images.items()],
        "annotations": [{"id": i, "image_id": image_id, "caption": c} for i, (image_id, c) in enumerate(annotations)],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def decode(data: bytes) -> np.ndarray:
    """How the pipeline sees stored bytes: TF's decoder, 3 channels."""
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
