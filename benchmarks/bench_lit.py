"""LiT (locked image tower, trained text tower): cached image features vs the image backbone every step.

A CLIP ViT-B/32-sized pair with random weights (`b32_preset.py`; the cost is the real model's), projection heads,
`paired.image_trainable=false`, `paired.text_trainable=true`, through the same `train()` entry point; only
`feature_cache` differs. Both runs train the same epochs on the same synthetic images and captions.

    python benchmarks/bench_lit.py                                  # 256 images, 2 epochs each
    python benchmarks/bench_lit.py --num-images 128 --sequence-length 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from b32_preset import make_b32_preset
from bench_train import timed_run

from dual_encoder.config import Config, DataConfig, TrainConfig
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic
from dual_encoder.model_config import HeadsConfig, ModelConfig, PairedConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run (>= 2)")
    parser.add_argument("--sequence-length", type=int, default=77, help="text tokens (CLIP's own: 77)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-lit-"))
    preset = make_b32_preset(workdir / "clip-b32")
    data = workdir / "prepared"
    if not data.is_dir():  # a --workdir of an earlier run keeps its dataset (and its feature cache)
        captions = generate_synthetic(workdir / "shapes", args.num_images, seed=0, image_size=64)
        prepare_dataset("csv", captions, captions.parent / "images", data, DataConfig(validation_fraction=0.1), progress=False)

    model = ModelConfig(
        paired=PairedConfig(str(preset), args.sequence_length, image_trainable=False, text_trainable=True),
        heads=HeadsConfig(kind="projection", embed_dim=256),
    )
    runs = {}
    for cache in (True, False):
        train_config = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, feature_cache=cache, tensorboard=False)
        runs[cache] = timed_run(Config(model=model, train=train_config), data, workdir / f"cache-{cache}")
    (ours_total, ours_epochs), (live_total, live_epochs) = runs[True], runs[False]
    ours_setup, live_setup = ours_total - sum(ours_epochs), live_total - sum(live_epochs)
    ours_steady, live_steady = statistics.mean(ours_epochs[1:]), statistics.mean(live_epochs[1:])

    print(f"\n{args.num_images} images, CLIP ViT-B/32-sized pair (random weights), image tower locked, text tower "
          f"trained ({args.sequence_length} tokens), batch {args.batch_size}, {args.epochs} epochs each\n")
    print("| measure | cached image features (ours) | image backbone every step | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one-time set-up incl. feature extraction | {ours_setup:.1f} s | {live_setup:.1f} s | |")
    print(f"| first epoch (incl. validation) | {ours_epochs[0]:.1f} s | {live_epochs[0]:.1f} s | "
          f"{live_epochs[0] / ours_epochs[0]:.2f}x |")
    print(f"| epoch after the first (mean, incl. validation) | {ours_steady:.1f} s | {live_steady:.1f} s | "
          f"**{live_steady / ours_steady:.2f}x** |")
    print(f"| whole run, {args.epochs} epochs | {ours_total:.1f} s | {live_total:.1f} s | {live_total / ours_total:.2f}x |")
    print(f"\nworkdir: {workdir}")


if __name__ == "__main__":
    main()
