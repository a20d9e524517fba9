"""A tiny real model and index for the serving tests (untrained: the plumbing, not the ranking, is tested)."""

from __future__ import annotations

import csv
from pathlib import Path

from dual_encoder.config import DataConfig, IndexConfig, ModelConfig
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import generate_synthetic
from dual_encoder.index import DatasetSplit, build_index
from dual_encoder.models import build_dual_encoder, save_model

TINY_MODEL = ModelConfig(
    image_size=32, image_width=8, text_width=16, embed_dim=16, vocabulary_size=200, sequence_length=12
)


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
