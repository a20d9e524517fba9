"""A tiny prepared synthetic dataset shared by the training tests."""

import pytest

from dual_encoder.config import DataConfig
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-shapes")
    captions = generate_synthetic(root / "shapes", 48, seed=0, image_size=32)
    prepare_dataset(
        "csv",
        captions,
        captions.parent / "images",
        root / "prepared",
        DataConfig(validation_fraction=0.25),
        progress=False,
    )
    return root / "prepared"
