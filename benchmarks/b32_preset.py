"""A CLIP ViT-B/32-sized KerasHub preset with random weights, made offline (timing only: the cost is the real model's).

Vision: patch 32, width 768, 12 layers, 12 heads, MLP 3072, 224x224; text: vocabulary 49,408, width 512, 12 layers,
8 heads, MLP 2048, 77 tokens; projection 512; the real image converter settings (bicubic, CLIP's mean and std).
The tokenizer is character-level (every text is packed to 77 tokens anyway, so the text tower's cost is the same).
"""

from __future__ import annotations

import string
from pathlib import Path

import keras_hub

IMAGE_SIZE = 224
SEQUENCE_LENGTH = 77
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _vocabulary() -> tuple[dict, list]:
    vocabulary = {"!": 0}
    for char in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        vocabulary.setdefault(char, len(vocabulary))
        vocabulary.setdefault(char + "</w>", len(vocabulary))
    merges = ["a n", "an d</w>"]  # the tokenizer wants at least one merge; both parts of each are in the vocabulary
    vocabulary.setdefault("an", len(vocabulary))
    vocabulary.setdefault("and</w>", len(vocabulary))
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)  # CLIP pools at the largest id: EOS
    return vocabulary, merges


def make_b32_preset(folder: Path) -> Path:
    """Write the preset to `folder` (once; an existing preset there is reused) and return it."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder  # a Path: pass str(folder) to KerasHub
    vocabulary, merges = _vocabulary()
    backbone = keras_hub.models.CLIPBackbone(
        vision_encoder=keras_hub.models.CLIPVisionEncoder(32, 768, 12, 12, 3072, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        text_encoder=keras_hub.models.CLIPTextEncoder(49408, 512, 512, 12, 8, 2048, max_sequence_length=SEQUENCE_LENGTH),
        projection_dim=512,
    )
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        scale=[1.0 / (s * 255) for s in STD],
        offset=[-m / s for m, s in zip(MEAN, STD)],
        interpolation="bicubic",
    )
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, converter, sequence_length=SEQUENCE_LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder  # a Path: pass str(folder) to KerasHub
