"""The model's config: one section per tower family, each declaring what it needs; the heads; the loss.

A `ModelConfig` holds an `image` and a `text` section (one family each: the section's `backbone` picks it) or one
`paired` section (a CLIP / SigLIP preset supplies both towers), plus `heads` and `loss`. Its fields are the
`DualEncoder`'s arguments. `migrate_flat` reads the flat form (every field in one section) that model folders of
format 1, run folders and presets were written in before.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Optional, Union

from dual_encoder.config_values import (
    DROPOUT, NON_NEGATIVE, POSITIVE, Allowed, ConfigError, build_section,
)  # fmt: skip


class TowerFamily:
    """What each tower family's section declares about itself (class attributes, not config fields).

    Attributes:
        family: its name in messages and in the feature cache's key.
        towers: the towers it builds: ("image",), ("text",) or both.
        backbones: the names its `backbone` field takes (the registry keys of the model code).
        needs_vocabulary: its vocabulary is built from the training captions (`build_dual_encoder(captions=)`).
        needs_tensorflow_text: its tokenizer's graph uses TF Text ops: loading an export needs `import tensorflow_text`.
        trims_padding: cutting a batch's trailing padding columns leaves every text's features unchanged (attention
            masked by `padding_mask`, positions counted from the start): feature extraction then runs captions
            sorted by length, each batch at its longest caption's length.
        joint_space: its towers already share one embedding space, so `heads.kind` may be `none`.
        allowed: ranges and choices of its fields.
        flat_names: the flat `ModelConfig` name (format 1) of each of its fields.
    """

    family: ClassVar[str] = ""
    towers: ClassVar[tuple[str, ...]] = ()
    backbones: ClassVar[tuple[str, ...]] = ()
    needs_vocabulary: ClassVar[bool] = False
    needs_tensorflow_text: ClassVar[bool] = False
    trims_padding: ClassVar[bool] = False
    joint_space: ClassVar[bool] = False
    allowed: ClassVar[dict[str, Allowed]] = {}
    flat_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def describe(cls) -> str:
        """`the small_cnn image tower`, for messages."""
        return f"the {cls.family} {' and '.join(cls.towers)} tower" + "s" * (len(cls.towers) > 1)

    def is_trainable(self, tower: str) -> bool:
        return self.trainable

    def tower_settings(self, tower: str) -> dict[str, Any]:
        """What defines `tower`'s backbone: the feature cache's key hashes it when the tower is locked."""
        return {"family": self.family, **dataclasses.asdict(self)}


_IMAGE_FLAT = {
    "image_backbone": "backbone", "image_size": "size", "image_weights": "weights", "image_trainable": "trainable",
}  # fmt: skip
_TEXT_FLAT = {
    "text_backbone": "backbone", "text_pooling": "pooling", "sequence_length": "sequence_length",
    "text_trainable": "trainable",
}  # fmt: skip
_POOLINGS = Allowed(choices=("cls", "mean"))  # what the BERT towers offer of models.layers.TEXT_POOLINGS
_SEQUENCE_LENGTH = Allowed(low=2)


@dataclasses.dataclass(frozen=True)
class SmallCnnConfig(TowerFamily):
    """Image towers trained from scratch (`models.image_encoder`): `small_cnn`, `small_cnn_pooled`, `small_cnn_detectors`,
    `small_cnn_cells`."""

    family = "small_cnn"
    towers = ("image",)
    backbones = ("small_cnn", "small_cnn_pooled", "small_cnn_detectors", "small_cnn_cells")
    allowed = {"backbone": Allowed(choices=backbones), "size": Allowed(low=16), "width": POSITIVE}
    flat_names = {**_IMAGE_FLAT, "image_width": "width"}

    backbone: str = "small_cnn"
    size: int = 64  # side of the square input
    width: int = 32  # base width: stages of width, 2x and 3x
    weights: Optional[str] = None  # a local .weights.h5 file of this backbone, or None (random)
    trainable: bool = True


@dataclasses.dataclass(frozen=True)
class ApplicationConfig(TowerFamily):
    """`keras.applications` image backbones, headless and average-pooled, with their own `preprocess_input`."""

    family = "keras_applications"
    towers = ("image",)
    backbones = ("xception", "efficientnetv2_b0", "mobilenetv3_small", "resnet50")
    allowed = {"backbone": Allowed(choices=backbones), "size": Allowed(low=16)}
    flat_names = _IMAGE_FLAT

    backbone: str = "xception"
    size: int = 299
    weights: Optional[str] = "imagenet"  # "imagenet" (downloaded once), a local .weights.h5 file, or None (random)
    trainable: bool = False


@dataclasses.dataclass(frozen=True)
class SmallTransformerConfig(TowerFamily):
    """A transformer text tower trained from scratch; its vocabulary comes from the training captions and its
    tokenizer (Keras `TextVectorization`) uses only core TF ops."""

    family = "small_transformer"
    towers = ("text",)
    backbones = ("small_transformer",)
    needs_vocabulary = True
    allowed = {
        "backbone": Allowed(choices=backbones), "pooling": Allowed(choices=("cls", "mean", "tokens")),
        "sequence_length": _SEQUENCE_LENGTH, "vocabulary_size": Allowed(low=4), "width": POSITIVE, "layers": POSITIVE,
        "heads": POSITIVE, "dropout": DROPOUT,
    }  # fmt: skip
    flat_names = {
        **_TEXT_FLAT, "vocabulary_size": "vocabulary_size", "text_width": "width", "text_layers": "layers",
        "text_heads": "heads", "dropout": "dropout",
    }  # fmt: skip

    backbone: str = "small_transformer"
    vocabulary_size: int = 2000  # tokens kept from the training captions (2 more for padding and OOV)
    sequence_length: int = 32
    width: int = 64
    layers: int = 1
    heads: int = 2
    dropout: float = 0.1
    pooling: str = "mean"  # cls | mean | tokens (every token's output, for heads.kind second_order)
    trainable: bool = True


@dataclasses.dataclass(frozen=True)
class KerasHubBertConfig(TowerFamily):
    """A KerasHub BERT backbone and its WordPiece tokenizer (TF Text ops in the graph)."""

    family = "keras_hub_bert"
    towers = ("text",)
    backbones = ("keras_hub",)
    needs_tensorflow_text = True
    trims_padding = True  # BERT: masked attention, learnt absolute positions
    allowed = {"backbone": Allowed(choices=backbones), "pooling": _POOLINGS, "sequence_length": _SEQUENCE_LENGTH}
    flat_names = {**_TEXT_FLAT, "text_preset": "preset"}

    backbone: str = "keras_hub"
    preset: Optional[str] = None  # a KerasHub preset name, a KerasHub preset folder or a Hugging Face BERT folder
    sequence_length: int = 128
    pooling: str = "cls"  # cls: pooled_output | mean: masked mean of sequence_output
    trainable: bool = False


@dataclasses.dataclass(frozen=True)
class TFHubConfig(TowerFamily):
    """A TF-Hub BERT encoder and its preprocess model (`hub.load`, URL or local folder; TF Text ops)."""

    family = "tf_hub_bert"
    towers = ("text",)
    backbones = ("tf_hub",)
    needs_tensorflow_text = True
    allowed = {"backbone": Allowed(choices=backbones), "pooling": _POOLINGS, "sequence_length": _SEQUENCE_LENGTH}
    flat_names = {**_TEXT_FLAT, "text_preset": "encoder", "text_preprocessor": "preprocessor"}

    backbone: str = "tf_hub"
    encoder: Optional[str] = None  # TF-Hub handle of the encoder
    preprocessor: Optional[str] = None  # TF-Hub handle of its preprocess model
    sequence_length: int = 128
    pooling: str = "cls"
    trainable: bool = False


@dataclasses.dataclass(frozen=True)
class PairedConfig(TowerFamily):
    """A KerasHub CLIP / SigLIP / SigLIP 2 preset: both towers, their image converter, tokenizer (TF Text ops)
    and projections, in one joint space."""

    family = "keras_hub_paired"
    towers = ("image", "text")
    needs_tensorflow_text = True
    joint_space = True
    allowed = {"sequence_length": _SEQUENCE_LENGTH}
    flat_names = {"image_trainable": "image_trainable", "text_trainable": "text_trainable"}

    preset: str = ""  # a KerasHub preset name ("clip_vit_base_patch32") or a local preset folder
    sequence_length: Optional[int] = None  # tokens per text; None keeps the preset's
    image_trainable: bool = False
    text_trainable: bool = False

    def __post_init__(self):
        if not self.preset:
            raise ConfigError("model.paired.preset must be a KerasHub preset name or a local preset folder")

    def is_trainable(self, tower: str) -> bool:
        return getattr(self, f"{tower}_trainable")

    def tower_settings(self, tower: str) -> dict[str, Any]:
        settings = {"family": self.family, "preset": self.preset, "trainable": self.is_trainable(tower)}
        return {**settings, "sequence_length": self.sequence_length} if tower == "text" else settings


HEAD_KINDS = ("projection", "second_order", "none")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """The projection heads (`models.layers`).

    `projection`: dense -> (gelu -> dense -> dropout -> residual -> layernorm) x layers, L2-normalised, `embed_dim`
    long. `second_order` (an image backbone that keeps its cells, `small_cnn_cells`): each image cell and, on the
    text side, each window of `text_window` tokens (a text tower with `pooling: tokens`) or else `text_vectors`
    slots of the pooled features become vectors of `vector_dim`; the embedding is their Gram matrix beside a
    first-order part of `embed_dim` (`GramHead`: the score is quadratic, so colour binds to shape),
    `embed_dim + vector_dim * (vector_dim + 1) / 2` long. `none`: L2 normalisation only, for towers that share a
    joint space (zero-shot)."""

    allowed: ClassVar[dict[str, Allowed]] = {
        "kind": Allowed(choices=HEAD_KINDS), "embed_dim": POSITIVE, "layers": NON_NEGATIVE, "dropout": DROPOUT,
        "vector_dim": POSITIVE, "text_vectors": POSITIVE, "text_window": POSITIVE,
    }  # fmt: skip
    flat_names: ClassVar[dict[str, str]] = {"embed_dim": "embed_dim", "num_projection_layers": "layers", "dropout": "dropout"}

    kind: str = "projection"  # projection | second_order | none
    embed_dim: int = 256
    layers: int = 1
    dropout: float = 0.1
    vector_dim: int = 16  # second_order: size of each cell / slot vector
    text_vectors: int = 2  # second_order: slots of a text from pooled features
    text_window: int = 5  # second_order: tokens per window of a text tower with pooling tokens
    gram_root: bool = False  # second_order: the Gram matrix's square root (a small object counts beside a large one)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The contrastive objective (`dual_encoder.losses`), with what its constructor takes."""

    allowed: ClassVar[dict[str, Allowed]] = {
        "name": Allowed(choices=("clip", "soft_target", "siglip")),  # losses.LOSSES
        "temperature": Allowed(low=0, low_open=True), "max_logit_scale": Allowed(low=0, low_open=True),
    }  # fmt: skip
    flat_names: ClassVar[dict[str, str]] = {"loss": "name", "temperature": "temperature", "max_logit_scale": "max_logit_scale"}

    name: str = "clip"  # clip | soft_target | siglip
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    gather_negatives: bool = True  # score against every replica's examples (the loss of the global batch)


IMAGE_FAMILIES: tuple[type[TowerFamily], ...] = (SmallCnnConfig, ApplicationConfig)
TEXT_FAMILIES: tuple[type[TowerFamily], ...] = (SmallTransformerConfig, KerasHubBertConfig, TFHubConfig)
_FAMILIES = {"image": IMAGE_FAMILIES, "text": TEXT_FAMILIES}
ImageFamily = Union[SmallCnnConfig, ApplicationConfig]
TextFamily = Union[SmallTransformerConfig, KerasHubBertConfig, TFHubConfig]


def family_of(tower: str, backbone: Any) -> type[TowerFamily]:
    """The family section class of the `tower` ("image" / "text") backbone named `backbone`."""
    for family in _FAMILIES[tower]:
        if backbone in family.backbones:
            return family
    choices = [name for family in _FAMILIES[tower] for name in family.backbones]
    raise ConfigError(f"model.{tower}.backbone={json.dumps(backbone)} is not allowed: expected one of {', '.join(choices)}")


def image_backbones() -> list[str]:
    return [name for family in IMAGE_FAMILIES for name in family.backbones]


def text_backbones() -> list[str]:
    return [name for family in TEXT_FAMILIES for name in family.backbones]


SECTIONS = ("image", "text", "paired", "heads", "loss")  # the model's own sections, in order


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The two towers (`image` and `text`, or one `paired` preset for both), their heads and the loss.

    Example:
        >>> ModelConfig(image=SmallCnnConfig(size=32), text=SmallTransformerConfig(width=16))
        >>> ModelConfig(paired=PairedConfig("clip_vit_base_patch32"), heads=HeadsConfig(kind="none"))
    """

    image: Optional[ImageFamily] = None  # default small_cnn (unless `paired`)
    text: Optional[TextFamily] = None  # default small_transformer (unless `paired`)
    paired: Optional[PairedConfig] = None  # set: one CLIP / SigLIP preset supplies both towers
    heads: HeadsConfig = HeadsConfig()
    loss: LossConfig = LossConfig()

    def __post_init__(self):
        if self.paired is None:
            object.__setattr__(self, "image", self.image or SmallCnnConfig())
            object.__setattr__(self, "text", self.text or SmallTransformerConfig())
        elif self.image is not None or self.text is not None:
            raise ConfigError("model.paired supplies both towers: give it without model.image and model.text")
        if self.heads.kind == "none" and not all(self.tower(t).joint_space for t in ("image", "text")):
            raise ConfigError("model.heads.kind=none needs towers that share one embedding space (a model.paired preset)")

    def tower(self, name: str) -> TowerFamily:
        """The section that defines tower `name` ("image" or "text"): its own, or the paired one."""
        return self.paired if self.paired is not None else getattr(self, name)

    def tower_section_name(self, name: str) -> str:
        return "paired" if self.paired is not None else name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, changes: dict[str, Any]) -> "ModelConfig":
        """A copy with `section.field` keys changed, e.g. `{"image.weights": None}`."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            name, field = key.split(".")
            by_section.setdefault(name, {})[field] = value
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **fields) for name, fields in by_section.items()}
        )

    @classmethod
    def from_dict(cls, values: Any, where: str = "model") -> "ModelConfig":
        """A model config from its JSON form, sectioned or (migrated) flat; sections may also be instances."""
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{where}' must be a JSON object, got {type(values).__name__}")
        if is_flat(values):
            values = migrate_flat(values, where)
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown keys in config section '{where}': {unknown}; it has sections {', '.join(SECTIONS)}")
        sections = {}
        for name in SECTIONS:
            value = values.get(name)
            if value is None and name in ("heads", "loss"):
                continue  # their defaults
            if value is None or dataclasses.is_dataclass(value):
                sections[name] = value
                continue
            section_cls = section_class(name, value, where)
            what = section_cls.describe() if issubclass(section_cls, TowerFamily) else ""
            sections[name] = build_section(section_cls, value, f"{where}.{name}", section_cls.allowed, what)
        return cls(**sections)


def section_class(name: str, value: Any, where: str = "model") -> type:
    """The class of model section `name` whose JSON is `value`: for a tower, the family its `backbone` names
    (the first family's when it names none)."""
    if name in _FAMILIES:
        default = _FAMILIES[name][0]
        backbone = value.get("backbone", default.backbone) if isinstance(value, dict) else default.backbone
        try:
            return family_of(name, backbone)
        except ConfigError as error:
            raise ConfigError(str(error).replace("model.", f"{where}.", 1)) from None
    return {"paired": PairedConfig, "heads": HeadsConfig, "loss": LossConfig}[name]


# --- format 1: the flat ModelConfig --------------------------------------------------------------------------

FLAT_DEFAULTS: dict[str, Any] = {
    "image_backbone": "small_cnn", "image_weights": None, "image_size": 64, "image_trainable": True, "image_width": 32,
    "text_backbone": "small_transformer", "text_preset": None, "text_preprocessor": None, "text_pooling": "mean",
    "text_trainable": True, "sequence_length": 32, "vocabulary_size": 2000, "text_width": 64, "text_layers": 1,
    "text_heads": 2, "embed_dim": 256, "num_projection_layers": 1, "dropout": 0.1, "loss": "clip",
    "temperature": 0.07, "max_logit_scale": 100.0, "pretrained": None,
}  # fmt: skip
_PRETRAINED_HEADS = {"none": "none", "trained": "projection"}  # format 1's pretrained.heads -> heads.kind


def is_flat(values: dict) -> bool:
    """True for a model section in the flat form (format 1): flat field names, or `loss` as a name."""
    return any(key in FLAT_DEFAULTS and key not in SECTIONS for key in values) or isinstance(values.get("loss"), str)


def migrate_flat(flat: dict[str, Any], where: str = "model") -> dict[str, Any]:
    """The sectioned form of a flat (format 1) model section; its missing keys take format 1's defaults."""
    unknown = sorted(set(flat) - set(FLAT_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown keys in config section '{where}' (flat form): {unknown}")
    flat = {**FLAT_DEFAULTS, **flat}
    sections: dict[str, Any] = {"heads": _take(HeadsConfig, flat), "loss": _take(LossConfig, flat)}
    pretrained = flat["pretrained"]
    if pretrained:
        if not isinstance(pretrained, dict):
            raise ConfigError(f"{where}.pretrained={pretrained!r} is not allowed: expected an object or null")
        bad = sorted(set(pretrained) - {"preset", "heads", "sequence_length"})
        if bad:
            raise ConfigError(f"unknown keys in {where}.pretrained: {bad}")
        heads = pretrained.get("heads", "none")
        if heads not in _PRETRAINED_HEADS:
            raise ConfigError(f"{where}.pretrained.heads={heads!r} is not allowed: expected one of none, trained")
        sections["heads"]["kind"] = _PRETRAINED_HEADS[heads]
        paired = {key: pretrained[key] for key in ("preset", "sequence_length") if key in pretrained}
        sections["paired"] = {**paired, **_take(PairedConfig, flat)}
    else:
        sections["image"] = _take(family_of("image", flat["image_backbone"]), flat)
        sections["text"] = _take(family_of("text", flat["text_backbone"]), flat)
    return sections


def _take(section_cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    return {field: flat[name] for name, field in section_cls.flat_names.items()}


def flat_targets(model: dict[str, Any], flat_name: str) -> list[tuple[str, str]]:
    """(section, field) pairs that the flat name `flat_name` (format 1) stands for in a model section's JSON
    form: `dropout` was both the heads' and the small transformer's."""
    targets = []
    for name in SECTIONS:
        value = model.get(name)
        if value is None and name in ("image", "text", "paired"):
            continue  # absent: the towers come from the other kind of section
        flat_names = section_class(name, value or {}).flat_names
        if flat_name in flat_names:
            targets.append((name, flat_names[flat_name]))
    return targets
