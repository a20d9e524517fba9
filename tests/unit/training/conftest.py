"""A tiny prepared synthetic dataset and a tiny model recipe shared by the training tests."""

import dataclasses

import pytest

from dual_encoder.config import Config, DataConfig, ModelConfig, TrainConfig
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic

TINY_MODEL = ModelConfig(
    image_size=32,
    image_width=8,
    text_width=16,
    text_layers=1,
    text_heads=2,
    embed_dim=16,
    vocabulary_size=200,
    sequence_length=12,
    dropout=0.0,
)


def tiny_config(**train_overrides) -> Config:
    train = dataclasses.replace(TrainConfig(batch_size=8, epochs=2, tensorboard=True), **train_overrides)
    return Config(model=TINY_MODEL, train=train)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-shapes")
    captions = generate_synthetic(root / "shapes", 48, seed=0, image_size=32)
    prepare_dataset(
        "csv", captions, captions.parent / "images", root / "prepared", DataConfig(validation_fraction=0.25), progress=False
    )
    return root / "prepared"
