"""The `dual-encoder` command: parse arguments and call the library; no logic lives here.

Heavy imports (TensorFlow) happen inside the commands so `--help` stays fast; TensorFlow's start-up logging is
kept off stderr unless `--verbose` (`dual_encoder.tf_logging`).
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from dual_encoder import __version__, tf_logging
from dual_encoder.config import ALLOWED
from dual_encoder.data.synthetic import SyntheticOptions  # no TensorFlow: the defaults of `synthetic`
from dual_encoder.errors import DualEncoderError

# `--help` lists the commands in the order a user runs them.
WORKFLOW_ORDER = (
    "synthetic", "synthetic-queries", "prepare", "model", "train", "evaluate", "index", "search", "classify", "serve", "export", "demo",
)  # fmt: skip


class _WorkflowGroup(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        known = [name for name in WORKFLOW_ORDER if name in names]
        return known + [name for name in names if name not in known]


app = typer.Typer(
    name="dual-encoder",
    cls=_WorkflowGroup,
    help="Natural-language image search with a dual encoder: prepare data, train, index, search, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: a flag shows no value type (rich help shows `<bool>` for every flag)
)
index_app = typer.Typer(help="Build and update an image index.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(index_app, name="index")
model_app = typer.Typer(help="Make model folders without training.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(model_app, name="model")


class Source(str, enum.Enum):
    coco = "coco"
    csv = "csv"
    jsonl = "jsonl"
    folder = "folder"


# Choices mirror the library's registries (tests keep them equal) without importing TensorFlow for `--help`.
Split = enum.Enum("Split", {name: name for name in ("train", "validation")}, type=str)  # data.prepare.SPLITS
Strategy = enum.Enum(  # training.distribute.STRATEGY_NAMES
    "Strategy", {name: name for name in ("auto", "default", "mirrored", "multi_worker", "tpu")}, type=str
)
IndexKind = enum.Enum("IndexKind", {name: name for name in ALLOWED["index.kind"].choices}, type=str)
Runner = enum.Enum("Runner", {name: name for name in ("direct", "dataflow", "flink", "spark")}, type=str)  # index.beam.RUNNERS


def _flag(name: str, help: str):
    """A flag: present means True; it takes no value."""
    return typer.Option(False, name, help=help)


def _overrides(example: str):
    """`--set key=value`, repeatable: config overrides on top of the preset."""
    return typer.Option(
        [], "--set", metavar="KEY=VALUE", help=f"Override a config key (repeatable), e.g. {example}."
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dual-encoder {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    verbose: bool = _flag("--verbose", "Show TensorFlow's start-up logging (oneDNN, CUDA drivers, cuInit …)."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    tf_logging.configure(verbose)


def _config(preset: str, overrides: List[str], config_file: Optional[Path] = None):
    from dual_encoder.config import Config

    config = Config.load(config_file) if config_file else Config.from_preset(preset)
    return config.with_overrides(overrides)


def _overwrite_option(what: str):
    return _flag("--overwrite", f"Replace an existing {what} at --output (never another kind of folder).")


def _echo_json(value) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


_SYNTHETIC = SyntheticOptions()  # the generator's defaults, shown by the options below


@app.command()
def synthetic(
    output: Path = typer.Option(..., help="Folder to write images/, captions.csv and scenes.jsonl into."),
    num_images: int = typer.Option(5000, min=1, help="How many images to draw."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same dataset."),
    image_size: int = typer.Option(_SYNTHETIC.image_size, min=16, help="Image side in pixels."),
    partial_captions: float = typer.Option(
        _SYNTHETIC.partial_captions,
        min=0.0,
        max=1.0,
        help="Fraction of captions that name only some objects or attributes, as people write.",
    ),
    captions: str = typer.Option(
        f"{_SYNTHETIC.min_captions},{_SYNTHETIC.max_captions}", help="Captions per image: the fewest and the most."
    ),
    object_counts: str = typer.Option(
        ",".join(f"{p:g}" for p in _SYNTHETIC.object_counts), help="Probabilities of 1, 2 and 3 objects per image."
    ),
    queries: bool = _flag("--queries", "Also write a judged query set (queries.tsv, qrels.txt)."),
    min_relevant: int = typer.Option(10, min=1, help="With --queries: keep queries with this many relevant images."),
):
    """Generate the captioned-shapes dataset (the offline default): images, captions and each image's scene."""
    from dual_encoder.data.synthetic import SCENES_FILE, generate_synthetic, read_scenes

    try:
        counts = tuple(float(p) for p in object_counts.split(","))
        fewest, most = (int(n) for n in captions.split(","))
        options = SyntheticOptions(
            image_size=image_size,
            partial_captions=partial_captions,
            object_counts=counts,
            min_captions=fewest,
            max_captions=most,
        )
    except ValueError as error:
        raise DualEncoderError(f"--object-counts / --captions / --partial-captions: {error}") from None
    captions = generate_synthetic(output, num_images, seed=seed, options=options)
    typer.echo(f"{num_images} images, their captions and scenes written to {output} (captions: {captions})")
    if queries:
        _write_shape_queries(read_scenes(output / SCENES_FILE), output, min_relevant, seed)


def _write_shape_queries(scenes, output: Path, min_relevant: int, seed: int) -> None:
    from dual_encoder.data.judgements import write_query_set
    from dual_encoder.data.shape_queries import make_query_set

    query_set = make_query_set(scenes, min_relevant=min_relevant, seed=seed)
    queries_path, qrels_path = write_query_set(query_set, output)
    groups = ", ".join(f"{g} {list(query_set.groups.values()).count(g)}" for g in query_set.group_names())
    typer.echo(f"{len(query_set.queries)} judged queries ({groups}): {queries_path}, {qrels_path}")


@app.command("synthetic-queries")
def synthetic_queries(
    data: Path = typer.Option(..., help="A prepared captioned-shapes dataset (prepared with --metadata scenes.jsonl)."),
    output: Path = typer.Option(..., help="Folder to write queries.tsv and qrels.txt into."),
    split: Split = typer.Option(Split.validation, help="The split whose images are judged."),
    min_relevant: int = typer.Option(10, min=1, help="Keep queries with at least this many relevant images."),
    seed: int = typer.Option(0, help="Seed of the sample kept from large groups."),
):
    """Write a judged query set of short queries for one split of a prepared captioned-shapes dataset."""
    from dual_encoder.data.pipeline import read_split
    from dual_encoder.data.synthetic import split_scenes

    info = read_split(data, split.value)
    try:
        scenes = split_scenes(info.image_ids, info.metadata)
    except (ValueError, TypeError) as error:
        raise DualEncoderError(f"{data}: {error}") from None
    _write_shape_queries(scenes, output, min_relevant, seed)


@app.command()
def prepare(
    source: Source = typer.Option(..., help="Format of the pairs."),
    images_dir: Path = typer.Option(..., help="Folder the image paths are relative to."),
    output: Path = typer.Option(..., help="Folder to write TFRecord shards and manifest.json into."),
    input: Optional[Path] = typer.Option(None, "--input", help="Annotation file (not for --source folder)."),
    metadata: Optional[Path] = typer.Option(
        None, help="JSONL of per-image fields to keep (one object per line with 'image'), e.g. scenes.jsonl."
    ),
    preset: str = typer.Option("synthetic-small", help="Preset whose data section to use."),
    set_: List[str] = _overrides("validation_fraction=0.2"),
    quiet: bool = _flag("--quiet", "No progress bar."),
    allow_outside: bool = _flag(
        "--allow-outside", "Read image paths of the annotation file that lead outside --images-dir (absolute, ../)."
    ),
    overwrite: bool = _overwrite_option("prepared dataset made from other inputs"),
):
    """Turn image–caption pairs into sharded TFRecords with a train/validation split by image."""
    from dual_encoder.data.prepare import prepare_dataset

    if source is not Source.folder and input is None:
        raise DualEncoderError(f"--input is required for --source {source.value}")
    config = _config(preset, set_)
    summary = prepare_dataset(
        source.value, input, images_dir, output, config.data, progress=not quiet, metadata=metadata,
        allow_outside=allow_outside, overwrite=overwrite,
    )
    typer.echo(summary.summary_line())
    total = sum(summary.skipped.values())
    _echo_skipped([(s.item, s.reason, s.detail) for s in summary.first_skipped], total, summary.output / "manifest.json")


@app.command()
def train(
    data: Path = typer.Option(..., help="A prepared dataset folder."),
    output: Path = typer.Option(..., help="Run folder (model/, history.json, curves.png, backup/, logs/)."),
    preset: str = typer.Option("synthetic-small", help="Named recipe or a JSON config file."),
    set_: List[str] = _overrides("loss.name=siglip or text.width=128"),
    epochs: Optional[int] = typer.Option(None, min=1, help="Shorthand for --set epochs=N."),
    strategy: Strategy = typer.Option(Strategy.auto, help="How to distribute: auto picks TPU, multi-worker, "
                                      "mirrored (several GPUs) or default."),
    quiet: bool = _flag("--quiet", "No progress bars."),
    restart: bool = typer.Option(
        False, "--restart", "--overwrite", help="Start the run in --output afresh instead of resuming it."
    ),
    runner: Optional[Runner] = typer.Option(
        None, help="Compute the feature caches of the locked towers on Apache Beam (extra 'beam') with this runner."
    ),
    pipeline_option: List[str] = typer.Option(
        [], "--pipeline-option", metavar="KEY=VALUE", help="A Beam pipeline option (repeatable), as for index build."
    ),
    staging_dir: Optional[str] = typer.Option(
        None, help="With --runner: where the model and the feature shards go for the workers "
        "(default: inside --data; gs://… on Dataflow).",
    ),
    worker_data: Optional[str] = typer.Option(
        None, help="With --runner: the prepared dataset as workers see it, e.g. a copy at gs://bucket/prepared "
        "(default: --data).",
    ),
):
    """Train a dual encoder; re-running the same command resumes an interrupted run."""
    from dual_encoder.training.trainer import train as run_training

    overrides = list(set_) + ([f"epochs={epochs}"] if epochs else [])
    config = _config(preset, overrides)
    compute = None
    if runner is not None:
        from dual_encoder.index.beam import BeamFeatures

        compute = BeamFeatures(runner.value, tuple(pipeline_option), staging_dir, worker_data)
    elif pipeline_option or staging_dir or worker_data:
        raise DualEncoderError("--pipeline-option, --staging-dir and --worker-data go with --runner")
    result = run_training(
        config, data, output, strategy=strategy.value, progress=not quiet, restart=restart, compute_features=compute
    )
    typer.echo(f"Best model (epoch {result.best.get('epoch')}): {result.model_dir}")
    _echo_json(result.best)


@app.command()
def evaluate(
    model: Optional[Path] = typer.Option(None, help="A model folder or a run folder (with --data)."),
    data: Optional[Path] = typer.Option(None, help="A prepared dataset folder (with --model)."),
    split: Split = typer.Option(Split.validation, help="Which split to score."),
    index: Optional[Path] = typer.Option(None, help="Score a judged query set on this index instead (with --queries)."),
    queries: Optional[Path] = typer.Option(None, help="A judged query set: queries.tsv (id, query[, group])."),
    qrels: Optional[Path] = typer.Option(None, help="Its TREC qrels (default: qrels.txt beside --queries)."),
    batch_size: int = typer.Option(64, min=1),
):
    """Print retrieval metrics as JSON: caption recall@1/5/10 both ways, median rank, top-100 accuracy; with
    --queries, precision@10, R-precision, recall@100, nDCG@10 and MAP per query group (table on stderr)."""
    from dual_encoder.data.judgements import read_query_set
    from dual_encoder.evaluation import evaluate_query_set, evaluate_split, format_judged_table, split_gallery

    if index is not None and (model is not None or data is not None):
        raise DualEncoderError("give --model and --data (a prepared split), or --index, not both")
    if index is None and (model is None or data is None):
        raise DualEncoderError("give --model and --data (a prepared split), or --index with --queries")
    if index is not None and queries is None:
        raise DualEncoderError("--index needs --queries: an index has no captions to score")
    query_set = read_query_set(queries, qrels) if queries is not None else None
    report = {}
    if index is not None:
        from dual_encoder.search import Searcher

        searcher = Searcher.load(index)
        gallery = searcher.index.embeddings, [[item.path] for item in searcher.index.items]
        encode = searcher.encode_queries
    else:
        from dual_encoder.data.pipeline import require_images
        from dual_encoder.evaluation import text_encoder
        from dual_encoder.models import load_model

        require_images(data, split.value, "evaluate")
        loaded = load_model(model)
        report = evaluate_split(loaded, data, split.value, batch_size=batch_size)
        if query_set is not None:
            gallery = split_gallery(loaded, data, split.value, batch_size=batch_size)
            encode = text_encoder(loaded)
    if query_set is not None:
        judged = evaluate_query_set(encode, *gallery, query_set)
        typer.echo(format_judged_table(judged), err=True)
        report = {**report, "query_set": judged} if report else judged
    _echo_json(report)


def _gallery(images: Optional[Path], data: Optional[Path], split: str, list_file: Optional[Path]):
    from dual_encoder.index import DatasetSplit, ImageFolder, ImageList

    chosen = [s for s in (images, data, list_file) if s is not None]
    if len(chosen) != 1:
        raise DualEncoderError("give exactly one of --images FOLDER, --data PREPARED_DIR or --list FILE")
    if data is not None:
        return DatasetSplit(data, split)
    return ImageFolder(images) if images is not None else ImageList(list_file)


def _report_index(summary) -> None:
    reasons = ", ".join(f"{count} {reason}" for reason, count in summary.skipped_counts.items())
    typer.echo(
        f"{summary.count} items in {summary.index_dir} ({summary.kind}, {summary.dtype}, dim {summary.dim}): "
        f"{summary.embedded} embedded, {summary.reused} reused, {summary.replaced} replaced, "
        f"{summary.removed} removed, {summary.unchanged} unchanged, {len(summary.skipped)} skipped"
        + (f" ({reasons})" if reasons else "")
    )
    _echo_skipped([(s.path, s.reason, s.detail) for s in summary.skipped], len(summary.skipped))
    if summary.rebuild_due:
        typer.echo(
            f"  note: the {summary.kind} structure was trained on a gallery of a very different size; "
            f"`dual-encoder index rebuild --index {summary.index_dir}` retrains it (no image is re-embedded)",
            err=True,
        )


def _echo_skipped(named: list[tuple[str, str, str]], total: int, listed_in: Optional[Path] = None) -> None:
    """One stderr line per named skipped item (path, reason, detail), and how many more `listed_in` has."""
    for item, reason, detail in named:
        typer.echo(f"  skipped {item}: {reason}" + (f" ({detail})" if detail else ""), err=True)
    if total > len(named):
        typer.echo(f"  … and {total - len(named)} more" + (f", listed in {listed_in}" if listed_in else ""), err=True)


@index_app.command("build")
def index_build(
    model: Path = typer.Option(..., help="A model folder or a run folder."),
    output: Path = typer.Option(..., help="Index folder to write (an existing index is replaced atomically with --overwrite)."),
    images: Optional[Path] = typer.Option(None, help="An image folder (searched recursively)."),
    data: Optional[Path] = typer.Option(None, help="A prepared dataset (with --split)."),
    split: Split = typer.Option(Split.validation, help="Split of --data to index."),
    list_file: Optional[Path] = typer.Option(None, "--list", help="A file with one image path per line."),
    preset: str = typer.Option("synthetic-small", help="Preset whose index section to use."),
    set_: List[str] = _overrides("dtype=float16 or kind=hnsw"),
    kind: Optional[IndexKind] = typer.Option(None, help="Shorthand for --set kind=...: auto is exact up to "
                                             "index.ann_threshold items, hnsw up to index.ivfpq_threshold, then ivfpq."),
    quiet: bool = _flag("--quiet", "No progress bars."),
    overwrite: bool = _overwrite_option("index"),
    runner: Optional[Runner] = typer.Option(
        None, help="Embed on Apache Beam (extra 'beam') with this runner instead of in this process."
    ),
    pipeline_option: List[str] = typer.Option(
        [], "--pipeline-option", metavar="KEY=VALUE",
        help="A Beam pipeline option (repeatable), e.g. project=my-project or direct_num_workers=4.",
    ),
    shards_dir: Optional[str] = typer.Option(
        None, help="With --runner: where workers write embedding shards (default: beside --output; gs://… on Dataflow)."
    ),
    worker_model: Optional[str] = typer.Option(
        None, help="With --runner: the model folder as workers see it, e.g. a staged gs://bucket/model (default: --model)."
    ),
):
    """Embed a gallery with the model's image tower and write a searchable index."""
    from dual_encoder.index import build_index

    overrides = list(set_) + ([f"index.kind={kind.value}"] if kind else [])
    config = _config(preset, overrides)
    if runner is not None:
        from dual_encoder.index.beam import build_index_on_beam

        if data is not None or (images is None) == (list_file is None):
            raise DualEncoderError("--runner embeds an image folder (--images) or a list file (--list), one of them")
        _report_index(
            build_index_on_beam(
                model, images or list_file, output, config.index, runner=runner.value, options=pipeline_option,
                max_image_pixels=config.data.max_image_pixels, overwrite=overwrite, shards_dir=shards_dir,
                worker_model_dir=worker_model,
            )
        )
        return
    if pipeline_option or shards_dir or worker_model:
        raise DualEncoderError("--pipeline-option, --shards-dir and --worker-model go with --runner")
    gallery = _gallery(images, data, split.value, list_file)
    _report_index(
        build_index(
            model, gallery, output, config.index, progress=not quiet, max_image_pixels=config.data.max_image_pixels,
            overwrite=overwrite,
        )
    )


@index_app.command("add")
def index_add(
    index: Path = typer.Option(..., help="An existing index folder."),
    images: Path = typer.Option(..., help="An image folder or a list file; only new or changed files are embedded."),
    preset: str = typer.Option("synthetic-small", help="Preset whose data.max_image_pixels to use."),
    set_: List[str] = _overrides("max_image_pixels=100000000"),
    quiet: bool = _flag("--quiet", "No progress bars."),
):
    """Add new or changed images to an index."""
    from dual_encoder.index import add_to_index

    config = _config(preset, set_)
    _report_index(add_to_index(index, images, progress=not quiet, max_image_pixels=config.data.max_image_pixels))


@index_app.command("sync")
def index_sync(
    index: Path = typer.Option(..., help="An existing index folder."),
    images: Path = typer.Option(..., help="The image folder the index should mirror (searched recursively)."),
    preset: str = typer.Option("synthetic-small", help="Preset whose data.max_image_pixels to use."),
    set_: List[str] = _overrides("max_image_pixels=100000000"),
    quiet: bool = _flag("--quiet", "No progress bars."),
):
    """Mirror a folder in one atomic update: add new files, re-embed changed ones (content hash), remove missing ones."""
    from dual_encoder.index import sync_index

    config = _config(preset, set_)
    summary = sync_index(index, images, progress=not quiet, max_image_pixels=config.data.max_image_pixels)
    typer.echo(
        f"synced {images}: {len(summary.added_paths)} added, {len(summary.replaced_paths)} changed, "
        f"{len(summary.removed_paths)} removed, {summary.unchanged} unchanged"
    )
    _echo_changes(summary)
    _report_index(summary)


SHOWN_CHANGES = 5  # paths named per kind of change; the rest are counted


def _echo_changes(summary) -> None:
    """Name the first few added, changed and removed paths of an update, then how many more."""
    for sign, what, paths in (
        ("+", "added", summary.added_paths),
        ("~", "changed", summary.replaced_paths),
        ("-", "removed", summary.removed_paths),
    ):
        for path in paths[:SHOWN_CHANGES]:
            typer.echo(f"  {sign} {path}")
        if len(paths) > SHOWN_CHANGES:
            typer.echo(f"  {sign} … and {len(paths) - SHOWN_CHANGES} more {what}")
    if not summary.written:
        typer.echo("  nothing changed: the index was not rewritten")


@index_app.command("remove")
def index_remove(
    index: Path = typer.Option(..., help="An existing index folder."),
    paths: List[Path] = typer.Argument(None, help="Image files or folders to remove."),
    missing: bool = _flag("--missing", "Also remove items whose file no longer exists."),
):
    """Remove images from an index by path, or those whose file is gone."""
    from dual_encoder.index import remove_from_index

    if not paths and not missing:
        raise DualEncoderError("name paths to remove, or pass --missing")
    _report_index(remove_from_index(index, paths or (), missing=missing))


DedupMethod = enum.Enum("DedupMethod", {name: name for name in ("auto", "exact", "faiss")}, type=str)
SHOWN_GROUPS = 20  # groups listed on the console; --json and --grid have them all
# dual_encoder.index.dedup's defaults, written here so that --help imports no index code (a test compares them).
DEDUP_THRESHOLD, DEDUP_PIXEL_THRESHOLD = 0.8, 0.97


@index_app.command("dedup")
def index_dedup(
    index: Path = typer.Option(..., help="An index folder."),
    threshold: float = typer.Option(
        DEDUP_THRESHOLD, min=0.0, max=1.0,
        help="Embedding cosine at or above which two images are candidates (then checked by their pixels).",
    ),
    pixel_threshold: float = typer.Option(
        DEDUP_PIXEL_THRESHOLD, min=0.0, max=1.0,
        help="Pixel score (one image, possibly cropped, correlated with the other) a candidate needs to count.",
    ),
    embeddings_only: bool = _flag(
        "--embeddings-only", "Count every candidate, without reading images for the pixel check: then raise "
        "--threshold (0.95 is the best single cosine measured; BENCHMARKS.md)."
    ),
    method: DedupMethod = typer.Option(
        DedupMethod.auto, help="exact: chunked self-join; faiss: IVF range search (approximate); auto: exact up to "
        "1,000,000 items."
    ),
    json_: bool = _flag("--json", "Print the report as JSON: counts, group sizes and every group's items."),
    grid: Optional[Path] = typer.Option(None, help="Write a contact sheet PNG: one row per group (the largest 50)."),
    preset: str = typer.Option("synthetic-small", help="Preset whose data.max_image_pixels (images read) to use."),
    set_: List[str] = _overrides("ivf_nprobe=64"),
    quiet: bool = _flag("--quiet", "No progress bar while images are read."),
):
    """Find groups of near-duplicate images (re-encoded, resized, cropped or rotated copies) in an index."""
    from dual_encoder.index import find_duplicates
    from dual_encoder.index.dedup import write_groups_grid

    config = _config(preset, set_)
    report = find_duplicates(
        index, threshold=threshold, method=method.value,
        config=config.index if set_ else None,  # FAISS parameters: the index's own, unless --set gives some
        pixel_threshold=None if embeddings_only else pixel_threshold, max_image_pixels=config.data.max_image_pixels,
        progress=not (quiet or json_),
    )  # fmt: skip
    if json_:
        _echo_json(report.to_dict())
    else:
        sizes = ", ".join(f"{number} of {size}" for size, number in report.sizes.items())
        checked = (
            f"{report.candidates} candidates with cosine >= {report.threshold:g}, {report.pairs} confirmed by pixels "
            f"(>= {report.pixel_threshold:g})"
            if report.pixel_threshold is not None
            else f"{report.pairs} pairs with cosine >= {report.threshold:g}"
        )
        typer.echo(
            f"{len(report.groups)} groups of near-duplicates among {report.count} items ({checked}, {report.method}, "
            f"{report.seconds:.1f} s)" + (f"; sizes: {sizes}" if sizes else "")
        )
        if report.unreadable:
            typer.echo(f"{len(report.unreadable)} images could not be read (their pairs do not count), e.g. "
                       f"{report.unreadable[0]}")  # fmt: skip
        for number, group in enumerate(report.groups[:SHOWN_GROUPS], start=1):
            typer.echo(f"group {number}: {len(group)} images")
            for item_id, path, score in zip(group.ids, group.paths, group.scores):
                typer.echo(f"  {score:>7.4f}  {item_id:>8}  {path}")
        if len(report.groups) > SHOWN_GROUPS:
            typer.echo(f"… and {len(report.groups) - SHOWN_GROUPS} more groups (--json lists them all)")
    if grid is not None:
        written = write_groups_grid(report, grid, max_pixels=config.data.max_image_pixels) if report.groups else None
        typer.echo(f"grid: {written}" if written else "grid: none written (no near-duplicates)", err=json_)


@index_app.command("rebuild")
def index_rebuild(
    index: Path = typer.Option(..., help="An existing index folder."),
    kind: Optional[IndexKind] = typer.Option(None, help="Switch to this kind (default: the index's own settings)."),
    set_: List[str] = _overrides("ivfpq_nprobe=128 or rerank=512"),
):
    """Retrain an index's search structure from its stored embeddings (after many adds, or to change its kind)."""
    from dual_encoder.config import Config, IndexConfig
    from dual_encoder.index import rebuild_index
    from dual_encoder.index.store import read_manifest

    config = None
    if kind is not None or set_:
        own = Config(index=IndexConfig(**read_manifest(index)["config"]))
        config = own.with_overrides(list(set_) + ([f"index.kind={kind.value}"] if kind else [])).index
    _report_index(rebuild_index(index, config))


@app.command()
def search(
    query: Optional[List[str]] = typer.Argument(
        None, metavar="[QUERY]...", help="Queries, e.g. 'find images of a dog on a beach' (one with --image/--like)."
    ),
    index: Path = typer.Option(..., help="An index folder."),
    image: Optional[Path] = typer.Option(None, help="Search by this image (any format the index reads)."),
    like: Optional[int] = typer.Option(None, min=0, help="More like this: search by the indexed item with this id."),
    text_weight: float = typer.Option(1.0, min=0.0, help="Weight of the text in a mix with --image/--like."),
    image_weight: float = typer.Option(1.0, min=0.0, help="Weight of --image in a mix."),
    like_weight: float = typer.Option(1.0, min=0.0, help="Weight of --like in a mix."),
    k: Optional[int] = typer.Option(
        None, "-k", "--k", min=1, help="How many results per query [default: the preset's serve.default_k, 10]."
    ),
    json_: bool = _flag(
        "--json", "Print JSON: a list with one {query, normalized_query, hits} per query (plus image, like and "
        "weights where given), each hit {rank, id, path, score, caption}, however many queries."
    ),
    grid: Optional[Path] = typer.Option(None, help="Write a contact sheet PNG of the first query's results."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the one the index records)."),
    preset: str = typer.Option("synthetic-small", help="Preset whose serve.default_k and data.max_image_pixels to use."),
    set_: List[str] = _overrides("default_k=20"),
):
    """Search an index with natural-language queries, an image, an indexed item (--like), or a weighted mix
    (e.g. --image beach.jpg "at night")."""
    from dual_encoder.search import Searcher, write_grid

    texts = list(query or [])
    if image is None and like is None and not texts:
        raise DualEncoderError("give a query, --image FILE or --like ID")
    if (image is not None or like is not None) and len(texts) > 1:
        raise DualEncoderError("with --image or --like, give at most one text query (it is mixed in)")
    config = _config(preset, set_)
    searcher = Searcher.load(index, model_dir=model, max_image_pixels=config.data.max_image_pixels)
    k = k or config.serve.default_k
    if image is None and like is None:
        results = searcher.search(texts, k=k)
    else:
        weights = {"text_weight": text_weight, "image_weight": image_weight, "like_weight": like_weight}
        results = [searcher.search(texts[0] if texts else None, k=k, image=image, like=like, **weights)]
    if json_:
        _echo_json([result.to_dict() for result in results])
    else:
        for result in results:
            if result.image is None and result.like is None:
                typer.echo(f'\n"{result.query}"  (searched as "{result.normalized_query}")')
            else:
                typer.echo(f"\n{result.describe()}" + (f"  (weights {result.weights})" if result.weights else ""))
            typer.echo(f"{'rank':>4}  {'score':>7}  {'id':>8}  path")
            for hit in result.hits:
                typer.echo(f"{hit.rank:>4}  {hit.score:>7.4f}  {hit.id:>8}  {hit.path}")
    if grid is not None:
        typer.echo(f"grid: {write_grid(results[0], grid, max_pixels=config.data.max_image_pixels)}")


@model_app.command("create")
def model_create(
    output: Path = typer.Option(..., help="The model folder to write."),
    preset: Optional[str] = typer.Option(
        None, help="A product preset with a paired section, e.g. clip-vit-b32, siglip2-b16-224."
    ),
    from_keras_hub: Optional[str] = typer.Option(
        None, "--from-keras-hub", help="A KerasHub CLIP / SigLIP preset name or a local preset folder."
    ),
    set_: List[str] = _overrides("paired.sequence_length=32"),
    overwrite: bool = _overwrite_option("model folder"),
):
    """A zero-shot model folder from a CLIP / SigLIP preset (downloads it once; loads offline afterwards)."""
    from dual_encoder.config import Config, ConfigError

    if (preset is None) == (from_keras_hub is None):
        raise ConfigError("give exactly one of --preset and --from-keras-hub")
    if from_keras_hub is not None:
        set_ = [f"paired.preset={json.dumps(from_keras_hub)}", "heads.kind=none", *set_]
    config = (Config() if from_keras_hub is not None else Config.from_preset(preset)).with_overrides(set_)
    from dual_encoder.models.pretrained import create_pretrained_model

    path = create_pretrained_model(config.model, output, overwrite=overwrite)
    typer.echo(f"model: {path}")


@app.command()
def classify(
    model: Optional[Path] = typer.Option(None, help="Model folder (with --index: default the one it records)."),
    labels: str = typer.Option(..., help='A file with one label a line, or "cat,dog,…".'),
    images: Optional[Path] = typer.Option(None, help="An image folder to classify (searched recursively)."),
    index: Optional[Path] = typer.Option(None, help="An index whose stored embeddings to classify."),
    templates: str = typer.Option("simple", help="Prompt templates: simple, imagenet (7-prompt ensemble) or a file."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Labels per image."),
    truth: Optional[Path] = typer.Option(None, help="CSV of path,label: print accuracy, write a confusion PNG."),
    confusion: Optional[Path] = typer.Option(None, help="Where to write the confusion PNG [default: beside --truth]."),
    json_: bool = _flag("--json", "Print JSON: {predictions, accuracy}."),
    csv_: Optional[Path] = typer.Option(None, "--csv", help="Write predictions as CSV (path,rank,label,score)."),
):
    """Zero-shot classification: each image gets the labels whose prompts it matches best."""
    from dual_encoder.classify import (
        ZeroShotClassifier, accuracy_report, embed_for_classification, read_truth, write_confusion_png,
    )  # fmt: skip

    loaded, paths, embeddings = embed_for_classification(model, images, index)
    classifier = ZeroShotClassifier(loaded, labels, templates)
    predictions = classifier.classify_embeddings(embeddings, paths, k=top_k)
    report = None
    if truth is not None:
        report = accuracy_report(predictions, read_truth(truth), classifier.labels)
        report["confusion_png"] = str(write_confusion_png(report, confusion or truth.with_suffix(".confusion.png")))
    if csv_ is not None:
        import csv as csv_module

        with open(csv_, "w", newline="", encoding="utf-8") as handle:
            writer = csv_module.writer(handle)
            writer.writerow(["path", "rank", "label", "score"])
            for p in predictions:
                writer.writerows([p.path, r + 1, l, f"{s:.6f}"] for r, (l, s) in enumerate(zip(p.labels, p.scores)))
    if json_:
        _echo_json({"predictions": [p.to_dict() for p in predictions], "accuracy": report})
        return
    if csv_ is None:
        for p in predictions:
            typer.echo(p.path + "  " + ", ".join(f"{l} {s:.3f}" for l, s in zip(p.labels, p.scores)))
    if report is not None:
        typer.echo(f"top-1 {report['top1_accuracy']:.4f}  top-5 {report['top5_accuracy']:.4f}  "
                   f"(chance {report['chance_top1']:.4f}, {report['images']} images)")  # fmt: skip
        for label, value in report["per_class_accuracy"].items():
            typer.echo(f"  {label:<20} {'-' if value is None else f'{value:.3f}'}")
        typer.echo(f"confusion: {report['confusion_png']}")


@app.command()
def export(
    index: Path = typer.Option(..., help="The index to bake into the searcher SavedModel."),
    output: Path = typer.Option(..., help="Folder for text_encoder/, image_encoder/ and searcher/."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the one the index records)."),
    overwrite: bool = _overwrite_option("export"),
):
    """Export SavedModels: text encoder, image encoder, and a searcher with the index baked in."""
    from dual_encoder.export import export_saved_models

    summary = export_saved_models(index, output, model_dir=model, overwrite=overwrite)
    for name, path in summary.artifacts.items():
        typer.echo(f"{name:<14} {path}  signatures: {', '.join(summary.signatures[name])}")


@app.command()
def serve(
    index: Path = typer.Option(..., help="The index to search."),
    host: Optional[str] = typer.Option(
        None, help="Address to bind [default: serve.host, 127.0.0.1: loopback unless you say otherwise]."
    ),
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="TCP port [default: serve.port, 8000]."),
    model: Optional[Path] = typer.Option(None, help="Model folder (default: the one the index records)."),
    preset: str = typer.Option("synthetic-small", help="Preset whose serve section (limits, default_k) to use."),
    set_: List[str] = _overrides("default_k=20 or max_k=50"),
):
    """Serve the search page and the HTTP API."""
    from dual_encoder.serve import run_server

    config = _config(preset, set_)
    run_server(
        index, host=host or config.serve.host, port=port or config.serve.port, model_dir=model,
        serve_config=config.serve, max_image_pixels=config.data.max_image_pixels,
    )


@app.command()
def demo(
    output: Path = typer.Option(Path("demo_output"), help="Folder for everything the demo writes."),
    quick: bool = _flag("--quick", "A reduced size (CI): a few hundred images, two epochs, no quality check."),
    quiet: bool = _flag("--quiet", "No progress bars."),
):
    """The offline demo: synthetic data, prepare, train, evaluate, index, queries, export."""
    from dual_encoder.demo import run_demo

    result = run_demo(output, scale="quick" if quick else "full", progress=not quiet)
    if result.targets_met is False:
        raise typer.Exit(1)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the command line and return the exit code (2 for bad input, with one clear line)."""
    try:
        app(args=argv, prog_name="dual-encoder")
    except SystemExit as exit_:  # Typer exits on its own after a command or a usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except DualEncoderError as error:
        typer.echo(f"error: {error}", err=True)
        return 2
    except OSError as error:  # the file system said no outside the outputs' own checks: still one line
        typer.echo(f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
