"""The offline demo: synthetic data -> prepare -> train -> evaluate (captions and short queries) -> index ->
queries -> export.

Everything runs on this package and its installed dependencies: no download. `quick` is the reduced size CI
runs; `full` is what `make demo` runs and checks against the quality targets, on the held-out split and on a
fresh gallery of new scenes with another object mix.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from dual_encoder.config import Config, DataConfig

# Full-caption text -> image recall on the 1,000-image held-out gallery.
TARGETS = {"t2i_recall@1": 0.90, "t2i_recall@10": 0.99}
# Precision@10 of short queries per group (`data.shape_queries`), on the held-out split and on a fresh gallery.
QUERY_TARGETS = {
    "shape": 0.95,
    "colour+shape": 0.90,
    "size+colour+shape": 0.85,
    "synonyms": 0.85,
    "colour+shape+position": 0.80,
    "two objects": 0.70,
}
FRESH_OBJECT_COUNTS = (1 / 3, 1 / 3, 1 / 3)  # the fresh gallery: a third of its images hold one object
EXAMPLE_QUERIES = ("find images of a red star", "a blue ring on the left", "show me a star and a circle")


@dataclasses.dataclass(frozen=True)
class DemoScale:
    """How big the demo's dataset, fresh gallery and training run are."""

    num_images: int
    validation_images: int
    fresh_images: int
    overrides: tuple[str, ...] = ()
    check_targets: bool = False
    min_relevant: int = 10  # queries need this many relevant images in a gallery


SCALES = {
    "full": DemoScale(num_images=7000, validation_images=1000, fresh_images=1000, check_targets=True),
    "quick": DemoScale(
        num_images=160, validation_images=40, fresh_images=60, overrides=("epochs=2", "batch_size=32"), min_relevant=3
    ),
}
STAGES = 9
METRIC_MEANINGS = {  # one line each, as the summary prints them
    "t2i_recall@1": "share of full captions whose own image ranks first among all held-out images",
    "t2i_recall@5": "... whose own image is in the top 5",
    "t2i_recall@10": "... whose own image is in the top 10",
    "i2t_recall@1": "share of images whose first-ranked caption is one of their own",
    "i2t_recall@5": "... with one of their own captions in the top 5",
    "i2t_recall@10": "... with one of their own captions in the top 10",
    "t2i_median_rank": "median rank of a caption's own image (1 = first)",
    "i2t_median_rank": "median rank of an image's first own caption",
    "top100_accuracy": "share of captions whose image is in the top 100 (the Keras example's figure)",
    "mean_recall": "mean of the six recalls: what training keeps the best epoch by",
    "captions": "full captions used as queries",
    "num_captions": "captions in the held-out split",
}
PATH_MEANINGS = {
    "images": "the generated images, captions.csv and scenes.jsonl",
    "dataset": "the prepared dataset (TFRecord shards, train and validation splits)",
    "fresh": "the fresh gallery's images and scenes",
    "run": "the training run: config.json, history.json, curves.png (loss and recall per epoch), logs/",
    "index": "the held-out images' search index",
    "fresh_index": "the fresh gallery's index",
    "queries": "the judged query sets (queries.tsv + qrels.txt per gallery)",
    "exported": "SavedModels for TF Serving",
    "grid": "the first example query's top results as a picture",
    "model": "the trained model (the best epoch)",
    "summary": "these figures as JSON",
}


@dataclasses.dataclass
class DemoResult:
    output: Path
    metrics: dict
    query_metrics: dict  # gallery name -> evaluate_query_set result (without per-query rows)
    targets_met: bool | None
    missed: list[str]
    paths: dict[str, str]
    seconds: dict[str, float]
    queries: list[dict]

    def summary(self) -> str:
        lines = ["", "Demo summary", "============", "  full-caption retrieval on the held-out gallery:"]
        lines += [
            f"    {name:<22} {value:.4f}  {METRIC_MEANINGS.get(name, '')}".rstrip()
            if isinstance(value, float)
            else f"    {name:<22} {value}  {METRIC_MEANINGS.get(name, '')}".rstrip()
            for name, value in self.metrics.items()
        ]
        for gallery, result in self.query_metrics.items():
            lines.append(f"  short queries, precision@10 on the {gallery} ({result['gallery']} images; chance in brackets):")
            lines += [
                f"    {group:<22} {s['P@10']:.3f} ({s['chance']['P@10']:.3f})  {s['queries']} queries"
                + (f"  target >= {QUERY_TARGETS[group]}" if group in QUERY_TARGETS else "")
                for group, s in result["groups"].items()
            ]
        if self.targets_met is not None:
            lines.append(f"  quality targets: {'met' if self.targets_met else 'MISSED: ' + '; '.join(self.missed)}")
        lines.append("  wrote:")
        lines += [f"    {name:<12} {path}  {PATH_MEANINGS.get(name, '')}".rstrip() for name, path in self.paths.items()]
        lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        lines += ["", "Next: search the held-out images from a web page:", f"  dual-encoder serve --index {self.paths['index']}"]
        return "\n".join(lines)


def missed_targets(metrics: dict, query_metrics: dict) -> list[str]:
    """Every target that a result misses, as "what: got < goal"."""
    missed = [f"{name} {metrics[name]:.3f} < {goal}" for name, goal in TARGETS.items() if metrics[name] < goal]
    for gallery, result in query_metrics.items():
        for group, goal in QUERY_TARGETS.items():
            got = result["groups"].get(group, {}).get("P@10")
            if got is None or got < goal:
                missed.append(f"{gallery} {group} P@10 {'none' if got is None else f'{got:.3f}'} < {goal}")
    return missed


def run_demo(
    output: str | Path = "demo_output",
    scale: str = "full",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage of the product on the synthetic dataset and return what it measured and wrote."""
    # Imported here: each pulls in TensorFlow.
    from dual_encoder.data.judgements import write_query_set
    from dual_encoder.data.pipeline import read_split
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.shape_queries import make_query_set
    from dual_encoder.data.synthetic import SCENES_FILE, SyntheticOptions, generate_synthetic, read_scenes, split_scenes
    from dual_encoder.evaluation import (
        evaluate_query_set,
        evaluate_split,
        format_judged_table,
        split_gallery,
        text_encoder,
    )
    from dual_encoder.export import export_saved_models
    from dual_encoder.index import DatasetSplit, ImageFolder, build_index
    from dual_encoder.models import load_model
    from dual_encoder.search import Searcher, write_grid
    from dual_encoder.training.trainer import train

    plan = SCALES[scale]
    output = Path(output)
    paths = {
        "images": output / "shapes",
        "dataset": output / "shapes-prepared",
        "fresh": output / "fresh-gallery",
        "run": output / "run",
        "index": output / "index",
        "fresh_index": output / "fresh-index",
        "queries": output / "queries",
        "exported": output / "exported",
        "grid": output / "results.png",
    }
    config = Config.from_preset("synthetic-small").with_overrides(plan.overrides)
    seconds: dict[str, float] = {}

    def stage(number: int, title: str) -> None:
        echo(f"\n[{number}/{STAGES}] {title}")

    start = time.perf_counter()
    stage(1, f"Generating {plan.num_images} captioned-shapes images (full and partial captions)")
    size = config.model.image.size
    captions = generate_synthetic(paths["images"], plan.num_images, seed=0, image_size=size, progress=progress)
    start = _lap(seconds, "generate", start)

    stage(2, "Preparing TFRecords (train/validation split by image, scenes kept as metadata)")
    data_config = DataConfig(validation_fraction=plan.validation_images / plan.num_images)
    summary = prepare_dataset(
        "csv", captions, captions.parent / "images", paths["dataset"], data_config, progress=progress,
        metadata=captions.parent / SCENES_FILE, overwrite=True,  # the demo's own folder: every run starts afresh
    )  # fmt: skip
    echo(summary.summary_line())
    start = _lap(seconds, "prepare", start)

    stage(3, f"Training {config.model.image.backbone} + {config.model.text.backbone} ({config.train.epochs} epochs)")
    result = train(config, paths["dataset"], paths["run"], progress=progress, restart=True)
    paths["model"] = result.model_dir
    start = _lap(seconds, "train", start)

    stage(4, "Full captions: text -> image retrieval on the held-out gallery")
    model = load_model(result.model_dir)
    metrics = evaluate_split(model, paths["dataset"], "validation")
    echo(json.dumps(metrics, indent=2))
    start = _lap(seconds, "evaluate", start)

    stage(5, "Short queries on the held-out gallery (judged against every held-out scene)")
    held_out = read_split(paths["dataset"], "validation")
    scenes = split_scenes(held_out.image_ids, held_out.metadata)
    held_out_queries = make_query_set(scenes, min_relevant=plan.min_relevant)
    write_query_set(held_out_queries, paths["queries"] / "held-out")
    embeddings, keys = split_gallery(model, paths["dataset"], "validation")
    query_metrics = {"held-out split": evaluate_query_set(text_encoder(model), embeddings, keys, held_out_queries)}
    echo(format_judged_table(query_metrics["held-out split"]))
    start = _lap(seconds, "short queries", start)

    stage(6, f"A fresh gallery: {plan.fresh_images} new scenes, a third with one object; index it, query it")
    fresh_options = SyntheticOptions(image_size=size, object_counts=FRESH_OBJECT_COUNTS)
    generate_synthetic(paths["fresh"], plan.fresh_images, seed=1, progress=progress, options=fresh_options)
    fresh_queries = make_query_set(read_scenes(paths["fresh"] / SCENES_FILE), min_relevant=plan.min_relevant)
    write_query_set(fresh_queries, paths["queries"] / "fresh")
    build_index(
        result.model_dir, ImageFolder(paths["fresh"] / "images"), paths["fresh_index"], config.index,
        progress=progress, overwrite=True,
    )  # fmt: skip
    fresh_searcher = Searcher.load(paths["fresh_index"])
    fresh_keys = [[item.path] for item in fresh_searcher.index.items]
    query_metrics["fresh gallery"] = evaluate_query_set(
        fresh_searcher.encode_queries, fresh_searcher.index.embeddings, fresh_keys, fresh_queries
    )
    echo(format_judged_table(query_metrics["fresh gallery"]))
    start = _lap(seconds, "fresh gallery", start)

    stage(7, "Indexing the held-out images")
    index = build_index(
        result.model_dir, DatasetSplit(paths["dataset"], "validation"), paths["index"], config.index,
        progress=progress, overwrite=True,
    )  # fmt: skip
    echo(f"{index.count} images indexed ({index.kind}, {index.dtype}, dim {index.dim})")
    start = _lap(seconds, "index", start)

    stage(8, "Searching the held-out images with short queries: where the matching images rank")
    searcher = Searcher.load(paths["index"])
    results = searcher.search(list(EXAMPLE_QUERIES), k=10)
    for found in results:
        matching = _matching(found.normalized_query, scenes)
        marks = "".join("+" if Path(hit.path).name in matching else "." for hit in found.hits)
        echo(
            f'\n  "{found.query}"  ->  searched as "{found.normalized_query}": top 10 {marks}  '
            f"({sum(m == '+' for m in marks)}/10 match; {len(matching)} of {len(scenes)} held-out images match)"
        )
        for hit in found.hits[:3]:
            echo(f"    {hit.rank}. {hit.score:.3f}  {Path(hit.path).name}  {_describe(scenes.get(Path(hit.path).name))}")
    write_grid(results[0], paths["grid"])
    start = _lap(seconds, "search", start)

    stage(9, "Exporting SavedModels (text encoder, image encoder, searcher)")
    exported = export_saved_models(paths["index"], paths["exported"], overwrite=True)
    echo("  " + ", ".join(str(p) for p in exported.artifacts.values()))
    _lap(seconds, "export", start)

    for gallery_result in query_metrics.values():
        per_query = gallery_result.pop("per_query")
        gallery_result["worst_queries"] = sorted(per_query, key=lambda q: q["P@10"])[:10]
    missed = missed_targets(metrics, query_metrics) if plan.check_targets else []
    demo = DemoResult(
        output=output,
        metrics=metrics,
        query_metrics=query_metrics,
        targets_met=not missed if plan.check_targets else None,
        missed=missed,
        paths={name: str(path) for name, path in {**paths, "summary": output / "summary.json"}.items()},
        seconds=seconds,
        queries=[r.to_dict() for r in results],
    )
    (output / "summary.json").write_text(json.dumps(dataclasses.asdict(demo), indent=2, default=str) + "\n")
    echo(demo.summary())
    return demo


def _matching(query: str, scenes: dict) -> set[str]:
    """The held-out images an example query's words describe (parsed back with the generator's vocabulary)."""
    from dual_encoder.data.shape_queries import parse_query, relevant_docs

    mentions = parse_query(query)
    return set(relevant_docs(mentions, scenes)) if mentions else set()


def _describe(scene) -> str:
    if not scene:
        return ""
    return "; ".join(f"{o.size} {o.colour} {o.shape} ({o.position})" for o in scene)


def _lap(seconds: dict, name: str, start: float) -> float:
    now = time.perf_counter()
    seconds[name] = round(now - start, 1)
    return now
