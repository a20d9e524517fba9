"""Tiny KerasHub CLIP and SigLIP presets made offline: a BPE vocabulary written here, a SentencePiece model
trained here, random weights, the image converters' real settings (bicubic / bilinear resize, scale, offset)."""

from __future__ import annotations

import io
import string
from pathlib import Path

import keras_hub

IMAGE_SIZE = 32
WORDS = ("a", "red", "blue", "green", "circle", "square", "star", "photo", "of", "the", "cat", "dog")


def _bpe_vocabulary():
    """Characters (word-inner and word-final), every word whole, a merge chain per word; EOS has the largest id."""
    vocabulary = {"!": 0}
    # Every character the tests write (real CLIP vocabularies cover all bytes): an unknown one is -1 in a graph.
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        vocabulary.setdefault(char, len(vocabulary))
        vocabulary.setdefault(char + "</w>", len(vocabulary))
    merges = []
    for word in WORDS:
        if len(word) < 2:
            continue
        # left-to-right merges: "r e" -> "re", "re d</w>" -> "red</w>"
        current = word[0]
        for index, char in enumerate(word[1:], start=1):
            right = char + ("</w>" if index == len(word) - 1 else "")
            merged = current + right
            if f"{current} {right}" not in merges:
                merges.append(f"{current} {right}")
            vocabulary.setdefault(merged, len(vocabulary))
            current = merged
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return vocabulary, merges


def make_clip_preset(folder: Path) -> Path:
    """A 2-layer CLIP (vision and text) with projection 16 saved with `save_to_preset` into `folder`."""
    vocabulary, merges = _bpe_vocabulary()
    tokenizer = keras_hub.models.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    backbone = keras_hub.models.CLIPBackbone(
        vision_encoder=keras_hub.models.CLIPVisionEncoder(8, 32, 2, 2, 64, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        text_encoder=keras_hub.models.CLIPTextEncoder(len(vocabulary), 32, 32, 2, 2, 64, max_sequence_length=12),
        projection_dim=16,
    )
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        scale=[1.0 / (0.26862954 * 255), 1.0 / (0.26130258 * 255), 1.0 / (0.27577711 * 255)],
        offset=[-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711],
        interpolation="bicubic",
    )
    preprocessor = keras_hub.models.CLIPPreprocessor(tokenizer, converter, sequence_length=12)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder


def _sentencepiece_proto() -> bytes:
    import sentencepiece

    sentences = [f"{a} {b} {c}" for a in WORDS for b in WORDS for c in ("photo", "star", "dog")]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        user_defined_symbols=[],
        minloglevel=2,
    )
    return model.getvalue()


def make_siglip_preset(folder: Path) -> Path:
    """A 2-layer SigLIP with a SentencePiece tokenizer trained here, saved into `folder`."""
    tokenizer = keras_hub.models.SigLIPTokenizer(proto=_sentencepiece_proto())
    backbone = keras_hub.models.SigLIPBackbone(
        vision_encoder=keras_hub.models.SigLIPVisionEncoder(8, 32, 2, 2, 64, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
        text_encoder=keras_hub.models.SigLIPTextEncoder(
            tokenizer.vocabulary_size(), 32, 32, 2, 2, 64, max_sequence_length=12
        ),
    )
    converter = keras_hub.layers.SigLIPImageConverter(
        image_size=(IMAGE_SIZE, IMAGE_SIZE), scale=1.0 / 127.5, offset=-1.0, interpolation="bilinear"
    )
    preprocessor = keras_hub.models.SigLIPPreprocessor(tokenizer, converter, sequence_length=12)
    backbone.save_to_preset(str(folder))
    preprocessor.save_to_preset(str(folder))
    return folder
