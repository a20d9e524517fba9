"""Models, images and vectors the index and search tests make themselves (nothing is downloaded)."""

import shutil
import signal
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from dual_encoder.models import build_dual_encoder, save_model
from tests.tiny import CAPTIONS, TINY_MODEL


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """An untrained small_cnn + small_transformer model dir; different seeds give different fingerprints."""
    keras.utils.set_random_seed(seed)
    return save_model(build_dual_encoder(TINY_MODEL, captions=CAPTIONS), directory)


def write_image(path: Path, seed: int, size: int = 40) -> Path:
    """A PNG (or JPEG, by suffix) of random 4x4 blocks: distinct seeds give distinct contents."""
    blocks = np.random.default_rng(seed).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)).save(path)
    return path


def write_images(folder: Path, count: int, first_seed: int = 0) -> list[Path]:
    return [write_image(folder / f"{first_seed + i:03d}.png", first_seed + i) for i in range(count)]


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: score every row, fully sort by (-score, row), keep k."""
    scores = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    order = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return order, np.take_along_axis(scores, order, axis=1)


def write_phone_photo(path: Path, orientation: int = 6) -> Path:
    """A JPEG stored 48 wide x 24 high, left half red and right half blue, with an EXIF orientation tag.

    Viewed upright with orientation 6 ("rotate 90° clockwise") it is 24 x 48 with red on top, blue below.
    """
    pixels = np.zeros((24, 48, 3), np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", exif=exif, quality=95)
    return path


def kill_during(target, pristine, command: list[str], ready: str, kill_after: float) -> tuple[bool, float]:
    """Restore `pristine` at `target`, start `command` (which prints `ready` when its write begins) and SIGKILL it
    `kill_after` s later; (whether it finished first, seconds it ran)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine, target)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == ready
    started = time.perf_counter()
    while process.poll() is None and time.perf_counter() - started < kill_after:
        time.sleep(0.002)
    finished = process.poll() is not None
    process.send_signal(signal.SIGKILL)  # no-op once the process has exited
    process.wait()
    return finished, time.perf_counter() - started
