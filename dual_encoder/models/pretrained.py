"""Paired pretrained towers: one KerasHub CLIP or SigLIP (SigLIP 2) preset supplies both towers.

The image tower holds the preset's own image converter (resize, rescale, normalise) in front of the vision
encoder and the model's vision projection; the text tower holds the preset's tokenizer (in the graph) in front
of the text encoder and its projection. Both output the model's joint space, not L2-normalised: the
`DualEncoder` heads (`heads.kind` none: L2 normalisation only, zero-shot; projection: trained heads) come after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import keras
import keras_hub
import tensorflow as tf  # the preprocessors' text ops are TensorFlow string ops
from keras import ops

from dual_encoder.data.pipeline import ImageResize
from dual_encoder.model_config import ModelConfig, PairedConfig
from dual_encoder.models.layers import ModelConfigError
from dual_encoder.models.text_encoder import TextEncoder, _first_line


def _clip_text(preprocessor, texts):
    return tf.strings.lower(texts) if preprocessor.to_lower else texts


def _siglip_text(preprocessor, texts):
    return preprocessor.canonicalize_inputs(texts) if preprocessor.canonicalize_text else texts


# The backbone class a preset's config.json names -> its preprocessor class (tokenizer + image converter) and
# the text normalisation that preprocessor applies before its tokenizer (its `call` minus the image part, which
# needs images: SigLIP's does not take text alone).
PAIRED_FAMILIES: dict[type, tuple[type, Callable]] = {
    keras_hub.models.CLIPBackbone: (keras_hub.models.CLIPPreprocessor, _clip_text),
    keras_hub.models.SigLIPBackbone: (keras_hub.models.SigLIPPreprocessor, _siglip_text),
}
PRESET_DIR = "pretrained_preset"  # inside a model folder's assets/


class PairedPreset:
    """A CLIP / SigLIP backbone and its preprocessor loaded once from `preset` (a KerasHub preset name or folder).

    Args:
        preset: a KerasHub preset name ("clip_vit_base_patch32", "siglip2_base_patch16_224") or a local preset
            folder (`save_to_preset` output).
        sequence_length: tokens per text; None keeps the preset's.
    """

    def __init__(self, preset: str, sequence_length=None):
        try:
            backbone = keras_hub.models.Backbone.from_preset(preset)
        except (ValueError, OSError, KeyError) as error:
            raise ModelConfigError(f"cannot load KerasHub preset '{preset}': {_first_line(error)}") from None
        family = next((f for b, f in PAIRED_FAMILIES.items() if isinstance(backbone, b)), None)
        if family is None:
            raise ModelConfigError(
                f"preset '{preset}' holds a {type(backbone).__name__}, not one of "
                f"{sorted(b.__name__ for b in PAIRED_FAMILIES)}"
            )
        kwargs = {} if sequence_length is None else {"sequence_length": sequence_length}
        try:
            self.preprocessor = family[0].from_preset(preset, **kwargs)
        except (ValueError, OSError, KeyError) as error:
            raise ModelConfigError(f"preset '{preset}' lacks its tokenizer or image converter: {_first_line(error)}") from None
        if self.preprocessor.image_converter is None:
            raise ModelConfigError(f"preset '{preset}' has no image converter (image_converter.json)")
        self.preprocessor.build(None)  # makes its packer
        self._normalise_text = family[1]
        self.preset = preset
        self.backbone = backbone
        self.image_size = int(self.preprocessor.image_converter.image_size[0])
        try:
            probe = backbone.get_text_embeddings(self.tokenize(tf.constant(["a"]))["token_ids"])
        except (tf.errors.InvalidArgumentError, ValueError) as error:  # SigLIP takes only its full length
            raise ModelConfigError(
                f"sequence_length {self.preprocessor.sequence_length} does not fit the text encoder of '{preset}' "
                f"(SigLIP needs exactly its max_sequence_length): {_first_line(error)}"
            ) from None
        self.output_dim = int(probe.shape[-1])

    def tokenize(self, texts) -> dict:
        """Strings [B] -> {"token_ids", "padding_mask"} [B, L], exactly as the preset's preprocessor makes them."""
        p = self.preprocessor
        token_ids, padding_mask = p.packer(
            p.tokenizer(self._normalise_text(p, texts)),
            sequence_length=p.sequence_length,
            add_start_value=p.add_start_token,
            add_end_value=p.add_end_token,
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def save(self, directory: Path) -> None:
        """Write the backbone, tokenizer and image converter as a KerasHub preset folder (loads offline)."""
        self.backbone.save_to_preset(str(directory))
        self.preprocessor.save_to_preset(str(directory))


class PretrainedImageEncoder(keras.layers.Layer):
    """Raw 0-255 RGB images (any size) -> the preset's image converter -> vision encoder -> its projection."""

    def __init__(self, paired: PairedPreset, trainable: bool = False, **kwargs):
        super().__init__(trainable=trainable, **kwargs)
        self.paired = paired
        self.backbone = paired.backbone
        self.image_converter = paired.preprocessor.image_converter
        self.image_size = paired.image_size
        self.output_dim = paired.output_dim
        self.grid = None  # one pooled vector, no cells (as `ImageEncoder.grid`)
        converter = self.image_converter
        # Decoders resize each image of any shape as the converter would (crop to aspect, its interpolation), in
        # float32: the converter's own resize in `call` is then the identity, and the pixels are the preset's.
        self.image_resize = ImageResize(
            self.image_size,
            crop_to_aspect_ratio=bool(converter.crop_to_aspect_ratio),
            interpolation=converter.interpolation,
            antialias=bool(converter.antialias),
            exact=True,
        )
        self.built = True

    def call(self, images, training=False):
        images = self.image_converter(ops.cast(images, "float32"))
        return self.backbone.get_vision_embeddings(images)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)


class PretrainedTextEncoder(TextEncoder):
    """Strings -> the preset's tokenizer and packer (in the graph) -> text encoder -> its projection."""

    def __init__(self, paired: PairedPreset, trainable: bool = False, **kwargs):
        super().__init__(pooling="cls", sequence_length=paired.preprocessor.sequence_length, trainable=trainable, **kwargs)
        self.paired = paired
        self.preprocessor = paired.preprocessor
        self.output_dim = paired.output_dim
        self.built = True

    def tokenize(self, texts) -> dict:
        return self.paired.tokenize(texts)

    def encode_token_ids(self, token_ids, padding_mask, training=False):
        del padding_mask  # CLIP pools at the EOS (largest) id; SigLIP pools over the whole sequence
        return self.paired.backbone.get_text_embeddings(token_ids)

    def save_assets(self, directory: Path) -> dict[str, str]:
        target = Path(directory) / PRESET_DIR
        self.paired.save(target)
        return {"preset": PRESET_DIR}


def build_pretrained_towers(config: PairedConfig):
    """(image tower, text tower) sharing one backbone loaded from `config.preset`."""
    paired = PairedPreset(config.preset, config.sequence_length)
    backbone = paired.backbone
    backbone.trainable = config.image_trainable or config.text_trainable
    # Both towers hold the one backbone: a locked side's layers must be frozen inside it too, or training the other
    # side (LiT) would train them whenever they run in the step.
    for side, trainable in (("vision", config.image_trainable), ("text", config.text_trainable)):
        for name in (f"{side}_encoder", f"{side}_projection"):
            if getattr(backbone, name, None) is not None:
                getattr(backbone, name).trainable = trainable
    image = PretrainedImageEncoder(paired, trainable=config.image_trainable, name="image_encoder")
    text = PretrainedTextEncoder(paired, trainable=config.text_trainable, name="text_encoder")
    return image, text


def create_pretrained_model(config: ModelConfig, output: str | Path, overwrite: bool = False) -> Path:
    """Write a zero-shot model folder from a paired preset (no training): weights, tokenizer, image converter and
    config inside, so it loads offline afterwards. Only `heads.kind: none` makes sense untrained."""
    from dual_encoder.models.dual_encoder import build_dual_encoder
    from dual_encoder.models.io import save_model

    if config.paired is None:
        raise ModelConfigError("model create needs a model config with a 'paired' section (a CLIP / SigLIP preset)")
    if config.heads.kind != "none":
        raise ModelConfigError("an untrained model needs heads.kind='none'; trained heads come from `train`")
    return save_model(build_dual_encoder(config), output, overwrite=overwrite)
