"""`index build` throughput with a ViT-B/32-sized image tower vs the bare backbone forward on the same images.

The model is a zero-shot CLIP ViT-B/32-sized pair with random weights (`b32_preset.py`; the cost is the real
model's). The gallery is `--num-images` JPEGs of 320x240 (non-square, as photos are). Ours: `build_index` on the
folder, whole (list, hash, read, decode, resize, the tower, save). The ceiling: the same images decoded and resized
beforehand (as the index pipeline does it), then only the vision encoder and its projection in batches of the same
size, traced and warmed up first. The ceiling runs before and after ours; the ratio uses their mean.

A build pays fixed costs that do not grow with the gallery (loading the model folder, tracing the tower, the
model's fingerprint). The build runs twice, on the first half of the photos and on all of them: the whole-command
rate counts those costs; the per-image rate, (N - N/2) / (t_N - t_N/2), is the throughput a large gallery sees.

    python benchmarks/bench_index.py                      # 256 images
    python benchmarks/bench_index.py --num-images 64      # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from b32_preset import make_b32_preset
from PIL import Image

from dual_encoder.config import IndexConfig
from dual_encoder.data.pipeline import decode_and_resize, image_input
from dual_encoder.index.build import build_index
from dual_encoder.model_config import HeadsConfig, ModelConfig, PairedConfig
from dual_encoder.models import load_model
from dual_encoder.models.pretrained import create_pretrained_model


def write_photos(folder: Path, count: int) -> list[Path]:
    """Smooth random colour fields with some noise, 320x240 JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((320, 240), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 21, (240, 320, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def bare_forward(model, images: np.ndarray, batch_size: int) -> float:
    """Images/s of the vision encoder + projection alone (the converter's scale and offset included)."""
    tower = model.image_encoder
    step = tf.function(tower.call, input_signature=[image_input(model).spec()])
    step(images[:batch_size])  # trace and warm up
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        step(images[start : start + batch_size]).numpy()
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-index-"))
    preset = make_b32_preset(workdir / "clip-b32")
    model_dir = workdir / "model"
    if not model_dir.is_dir():
        zero_shot = ModelConfig(paired=PairedConfig(preset=str(preset)), heads=HeadsConfig(kind="none"))
        create_pretrained_model(zero_shot, model_dir)
    photos = write_photos(workdir / "photos", args.num_images)
    config = IndexConfig()

    model = load_model(model_dir)
    resize = image_input(model)
    images = np.stack([decode_and_resize(path.read_bytes(), resize).numpy() for path in photos])
    before = bare_forward(model, images, config.embed_batch_size)
    half = workdir / "half"
    half.mkdir(exist_ok=True)
    for path in photos[: len(photos) // 2]:
        if not (half / path.name).exists():
            (half / path.name).symlink_to(path)
    seconds = {}
    for name, folder in (("half", half), ("all", workdir / "photos")):
        started = time.perf_counter()
        build_index(model_dir, folder, workdir / f"index-{name}", config, progress=False, overwrite=True)
        seconds[name] = time.perf_counter() - started
    ours = args.num_images / seconds["all"]
    marginal = (args.num_images - len(photos) // 2) / (seconds["all"] - seconds["half"])
    fixed = seconds["all"] - args.num_images / marginal  # what the whole build spends beyond its per-image rate
    after = bare_forward(model, images, config.embed_batch_size)
    ceiling = statistics.mean([before, after])

    print(f"\n{args.num_images} JPEGs 320x240, CLIP ViT-B/32-sized image tower (random weights), batch {config.embed_batch_size}\n")
    print("| measure | images/s | of the ceiling |")
    print("| --- | ---: | ---: |")
    print(f"| `index build` (whole: list, hash, read, decode, resize, embed, save; model load included) | {ours:.2f} | "
          f"{ours / ceiling:.0%} |")
    print(f"| `index build` per image: (N - N/2) / (t_N - t_N/2), fixed costs ({fixed:.1f} s) "
          f"taken out | {marginal:.2f} | **{marginal / ceiling:.0%}** |")
    print(f"| bare vision encoder + projection on the decoded images (ceiling; before / after ours) | {ceiling:.2f} "
          f"({before:.2f} / {after:.2f}) | 100% |")
    print(f"\nworkdir: {workdir}")


if __name__ == "__main__":
    main()
