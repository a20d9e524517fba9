"""The offline demo: synthetic data -> prepare -> train -> evaluate -> index -> queries -> export.

Everything runs on this package and its installed dependencies: no download. `quick` is the reduced size CI
runs; `full` is what `make demo` runs and checks against the quality targets.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from dual_encoder.config import Config, DataConfig

# Text -> image recall on the 1,000-image held-out gallery that the full demo must reach.
TARGETS = {"t2i_recall@1": 0.90, "t2i_recall@10": 0.99}
EXAMPLE_REQUESTS = ("find images of {}", "show me pictures of {}", "{}")


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """How big the demo's dataset and training run are."""

    num_images: int
    validation_images: int
    overrides: tuple[str, ...] = ()
    check_targets: bool = False


SCALES = {
    "full": DemoScale(num_images=7000, validation_images=1000, check_targets=True),
    "quick": DemoScale(num_images=160, validation_images=40, overrides=("epochs=2", "batch_size=32")),
}


@dataclasses.dataclass
class DemoResult:
    output: Path
    metrics: dict
    targets_met: bool | None
    paths: dict[str, str]
    seconds: dict[str, float]
    queries: list[dict]

    def summary(self) -> str:
        lines = ["", "Demo summary", "============"]
        lines += [f"  {name:<22} {value:.4f}" for name, value in self.metrics.items() if isinstance(value, float)]
        if self.targets_met is not None:
            goal = ", ".join(f"{k} >= {v}" for k, v in TARGETS.items())
            lines.append(f"  quality targets ({goal}): {'met' if self.targets_met else 'MISSED'}")
        lines.append("  wrote:")
        lines += [f"    {name:<12} {path}" for name, path in self.paths.items()]
        lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def run_demo(
    output: str | Path = "demo_output",
    scale: str = "full",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage of the product on the synthetic dataset and return what it measured and wrote."""
    # Imported here: each pulls in TensorFlow.
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.pipeline import read_split
    from dual_encoder.data.synthetic import generate_synthetic
    from dual_encoder.evaluation import evaluate_split
    from dual_encoder.export import export_saved_models
    from dual_encoder.index import DatasetSplit, build_index
    from dual_encoder.models import load_model
    from dual_encoder.search import Searcher, write_grid
    from dual_encoder.training.trainer import train

    plan = SCALES[scale]
    output = Path(output)
    paths = {
        "images": output / "shapes",
        "dataset": output / "shapes-prepared",
        "run": output / "run",
        "index": output / "index",
        "exported": output / "exported",
        "grid": output / "results.png",
    }
    config = Config.from_preset("synthetic-small").with_overrides(plan.overrides)
    seconds: dict[str, float] = {}

    def stage(number: int, title: str) -> None:
        echo(f"\n[{number}/7] {title}")

    start = time.perf_counter()
    stage(1, f"Generating {plan.num_images} captioned-shapes images")
    captions = generate_synthetic(paths["images"], plan.num_images, seed=0, image_size=config.model.image_size, progress=progress)
    start = _lap(seconds, "generate", start)

    stage(2, "Preparing TFRecords (train/validation split by image)")
    data_config = DataConfig(validation_fraction=plan.validation_images / plan.num_images)
    summary = prepare_dataset("csv", captions, captions.parent / "images", paths["dataset"], data_config, progress=progress)
    echo(summary.summary_line())
    start = _lap(seconds, "prepare", start)

    stage(3, f"Training {config.model.image_backbone} + {config.model.text_backbone} ({config.train.epochs} epochs)")
    result = train(config, paths["dataset"], paths["run"], progress=progress)
    paths["model"] = result.model_dir
    start = _lap(seconds, "train", start)

    stage(4, "Evaluating on the held-out gallery")
    model = load_model(result.model_dir)
    metrics = evaluate_split(model, paths["dataset"], "validation")
    echo(json.dumps(metrics, indent=2))
    start = _lap(seconds, "evaluate", start)

    stage(5, "Indexing the held-out images")
    index = build_index(result.model_dir, DatasetSplit(paths["dataset"], "validation"), paths["index"], config.index, progress=progress)
    echo(f"{index.count} images indexed ({index.kind}, {index.dtype}, dim {index.dim})")
    start = _lap(seconds, "index", start)

    stage(6, "Searching the held-out images with captions of a few of them")
    searcher = Searcher.load(paths["index"])
    held_out = read_split(paths["dataset"], "validation")
    wanted = [Path(path).name for path in held_out.paths[: len(EXAMPLE_REQUESTS)]]
    requests = [template.format(captions[0]) for template, captions in zip(EXAMPLE_REQUESTS, held_out.captions)]
    results = searcher.search(requests, k=5)
    for found, target in zip(results, wanted):
        echo(f'\n  "{found.query}"  ->  searched as "{found.normalized_query}"  (described image: {target})')
        for hit in found.hits[:3]:
            mark = "  <- the described image" if Path(hit.path).name == target else ""
            echo(f"    {hit.rank}. {hit.score:.3f}  {Path(hit.path).name}{mark}")
    write_grid(results[0], paths["grid"])
    start = _lap(seconds, "search", start)

    stage(7, "Exporting SavedModels (text encoder, image encoder, searcher)")
    exported = export_saved_models(paths["index"], paths["exported"])
    echo("  " + ", ".join(str(p) for p in exported.artifacts.values()))
    _lap(seconds, "export", start)

    met = all(metrics[name] >= goal for name, goal in TARGETS.items()) if plan.check_targets else None
    demo = DemoResult(
        output=output,
        metrics=metrics,
        targets_met=met,
        paths={name: str(path) for name, path in paths.items()},
        seconds=seconds,
        queries=[r.to_dict() for r in results],
    )
    (output / "summary.json").write_text(json.dumps(dataclasses.asdict(demo), indent=2, default=str) + "\n")
    echo(demo.summary())
    return demo


def _lap(seconds: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 1)
    return now
