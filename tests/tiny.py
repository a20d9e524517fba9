"""The tiny real model, config and index that tests across the suite build (nothing is downloaded)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from dual_encoder.config import Config, DataConfig, IndexConfig, TrainConfig
from dual_encoder.model_config import HeadsConfig, ModelConfig, SmallCnnConfig, SmallTransformerConfig
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic
from dual_encoder.index import DatasetSplit, build_index
from dual_encoder.models import build_dual_encoder, save_model

TINY_MODEL = ModelConfig(
    image=SmallCnnConfig(size=32, width=8),
    text=SmallTransformerConfig(width=16, layers=1, heads=2, vocabulary_size=200, sequence_length=12, dropout=0.0),
    heads=HeadsConfig(embed_dim=16, dropout=0.0),
)
CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a red square", "one large yellow star"]


def locked(config: ModelConfig) -> ModelConfig:
    """`config` with both backbones frozen (their features can be cached)."""
    return config.replace({"image.trainable": False, "text.trainable": False})


def tiny_config(**train_overrides) -> Config:
    """The tiny model with a short training run (batch 8, 2 epochs) unless overridden."""
    train = dataclasses.replace(TrainConfig(batch_size=8, epochs=2, tensorboard=True), **train_overrides)
    return Config(model=TINY_MODEL, train=train)


def build_tiny_index(root: Path, num_images: int = 40) -> Path:
    """Synthetic images -> prepared split -> untrained tiny model -> index of the train split (with captions).

    Returns the index directory; the model sits in `root/model`, the images in `root/synthetic/images`.
    """
    captions_csv = generate_synthetic(root / "synthetic", num_images, seed=0, image_size=32)
    with open(captions_csv, encoding="utf-8", newline="") as stream:
        captions = [row["caption"] for row in csv.DictReader(stream)]
    save_model(build_dual_encoder(TINY_MODEL, captions=captions), root / "model")
    prepared = root / "prepared"
    prepare_dataset("csv", captions_csv, captions_csv.parent / "images", prepared, DataConfig(), progress=False)
    build_index(root / "model", DatasetSplit(prepared, "train"), root / "index", IndexConfig(), progress=False)
    return root / "index"
