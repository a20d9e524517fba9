"""The `dual-encoder` command: parse arguments and call the library; no logic lives here.

Heavy imports (TensorFlow) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from dual_encoder.errors import DualEncoderError

app = typer.Typer(
    name="dual-encoder",
    help="Natural-language image search with a dual encoder: prepare data, train, index, search, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and update an image index.", no_args_is_help=True)
app.add_typer(index_app, name="index")



class Source(str, enum.Enum):
    coco = "coco"
    csv = "csv"
    jsonl = "jsonl"
    folder = "folder"


def _config(preset: str, overrides: List[str], config_file: Optional[Path] = None):
    from dual_encoder.config import Config

    config = Config.load(config_file) if config_file else Config.from_preset(preset)
    return config.with_overrides(overrides)


def _echo_json(value) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


@app.command()
def synthetic(
    output: Path = typer.Option(..., help="Folder to write images/ and captions.csv into."),
    num_images: int = typer.Option(5000, min=1, help="How many images to draw."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same dataset."),
    image_size: int = typer.Option(64, min=16, help="Image side in pixels."),
):
    """Generate the captioned-shapes dataset (the offline default) as images plus a captions CSV."""
    from dual_encoder.data.synthetic import generate_synthetic

    captions = generate_synthetic(output, num_images, seed=seed, image_size=image_size)
    typer.echo(f"{num_images} images and their captions written to {output} (captions: {captions})")


@app.command()
def prepare(
    source: Source = typer.Option(..., help="Format of the pairs."),
    images_dir: Path = typer.Option(..., help="Folder the image paths are relative to."),
    output: Path = typer.Option(..., help="Folder to write TFRecord shards and manifest.json into."),
    input: Optional[Path] = typer.Option(None, "--input", help="Annotation file (not for --source folder)."),
    preset: str = typer.Option("synthetic-small", help="Preset whose data section to use."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. validation_fraction=0.2."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Turn image–caption pairs into sharded TFRecords with a train/validation split by image."""
    from dual_encoder.data.prepare import prepare_dataset

    if source is not Source.folder and input is None:
        raise DualEncoderError(f"--input is required for --source {source.value}")
    config = _config(preset, set_)
    summary = prepare_dataset(source.value, input, images_dir, output, config.data, progress=not quiet)
    typer.echo(summary.summary_line())


@app.command()
def train(
    data: Path = typer.Option(..., help="A prepared dataset folder."),
    output: Path = typer.Option(..., help="Run folder (model/, history.json, curves.png, backup/, logs/)."),
    preset: str = typer.Option("synthetic-small", help="Named recipe or a JSON config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. loss=siglip."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Shorthand for --set epochs=N."),
    strategy: str = typer.Option("auto", help="auto, default, mirrored, multi_worker or tpu."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Train a dual encoder; re-running the same command resumes an interrupted run."""
    from dual_encoder.training.trainer import train as run_training

    overrides = list(set_) + ([f"epochs={epochs}"] if epochs else [])
    result = run_training(_config(preset, overrides), data, output, strategy=strategy, progress=not quiet)
    typer.echo(f"Best model (epoch {result.best.get('epoch')}): {result.model_dir}")
    _echo_json(result.best)


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="A model folder or a run folder."),
    data: Path = typer.Option(..., help="A prepared dataset folder."),
    split: str = typer.Option("validation", help="Which split to score."),
    batch_size: int = typer.Option(64, min=1),
):
    """Print retrieval metrics (recall@1/5/10 both ways, median rank, top-100 accuracy) as JSON."""
    from dual_encoder.evaluation import evaluate_split
    from dual_encoder.models import load_model

    _echo_json(evaluate_split(load_model(model), data, split, batch_size=batch_size))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the command line and return the exit code (2 for bad input, with one clear line)."""
    try:
        app(args=argv, prog_name="dual-encoder")
    except SystemExit as exit_:  # Typer exits on its own after a command or a usage error
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except DualEncoderError as error:
        typer.echo(f"error: {error}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
