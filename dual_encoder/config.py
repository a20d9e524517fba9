"""Typed, frozen configuration sections, presets as JSON, and `key=value` overrides.

The `ModelConfig` fields are the `DualEncoder` constructor arguments, so a training run and the
model directory it writes share one schema.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

from dual_encoder.errors import DualEncoderError

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(DualEncoderError, ValueError):
    """An unknown preset, section or key, or a malformed override."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How `prepare` splits and shards a dataset, and how the input pipeline reads it."""

    validation_fraction: float = 0.1
    split_seed: int = 0
    shard_size: int = 1000
    max_image_pixels: int = 64_000_000


PRETRAINED_HEADS = ("none", "trained")


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """A paired pretrained family (KerasHub CLIP / SigLIP / SigLIP 2): one preset supplies both towers.

    With it set, the model's image/text backbone fields (`image_backbone`, `text_backbone`, `text_preset`,
    `image_size`, `sequence_length`, …) are not used: the preset brings its own image converter, tokenizer and
    projections.
    """

    preset: str = ""  # KerasHub preset name ("clip_vit_base_patch32") or a local preset folder
    heads: str = "none"  # none: the model's own joint space (zero-shot) | trained: projection heads on top
    sequence_length: Optional[int] = None  # tokens per text; None keeps the preset's


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The two towers, their heads and the contrastive objective (the `DualEncoder` arguments)."""

    image_backbone: str = "small_cnn"
    image_weights: Optional[str] = None  # "imagenet", a local weights file, or None
    image_size: int = 64
    image_trainable: bool = True
    image_width: int = 32  # base width of `small_cnn`
    text_backbone: str = "small_transformer"  # small_transformer | keras_hub | tf_hub
    text_preset: Optional[str] = None  # KerasHub preset / local HF folder / TF-Hub encoder handle
    text_preprocessor: Optional[str] = None  # TF-Hub preprocess handle (tf_hub only)
    text_pooling: str = "mean"  # cls | mean
    text_trainable: bool = True
    sequence_length: int = 32
    vocabulary_size: int = 2000  # `small_transformer` vocabulary, built from training captions
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    embed_dim: int = 256
    num_projection_layers: int = 1
    dropout: float = 0.1
    loss: str = "clip"  # clip | soft_target | siglip
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    pretrained: Optional[PretrainedConfig] = None  # set: both towers come from one CLIP / SigLIP preset

    def __post_init__(self):
        if isinstance(self.pretrained, dict):  # from JSON (a saved model, a preset, an override)
            unknown = set(self.pretrained) - {f.name for f in dataclasses.fields(PretrainedConfig)}
            if unknown:
                raise ConfigError(f"unknown keys in model.pretrained: {sorted(unknown)}")
            object.__setattr__(self, "pretrained", PretrainedConfig(**self.pretrained))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop."""

    batch_size: int = 64  # images per step
    captions_per_image: int = 1  # captions each image brings to a step: the text side sees batch_size * this
    epochs: int = 20
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    warmup_fraction: float = 0.05
    min_learning_rate_ratio: float = 0.0
    gather_negatives: bool = True
    mixed_precision: bool = False  # compute in 16 bits, keep float32 variables, embeddings and loss
    # float16: GPUs (with loss scaling); bfloat16: TPUs and CPUs with AVX512-BF16 / AMX (no scaling needed)
    mixed_precision_dtype: str = "float16"
    feature_cache: bool = True  # embed each locked tower once and train on its cached features
    seed: int = 0
    early_stopping_patience: int = 0  # epochs without better validation recall; 0 = off
    reduce_lr_patience: int = 0  # halve the learning rate after this many flat epochs; 0 = off
    reduce_lr_factor: float = 0.5
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How galleries are embedded and searched."""

    dtype: str = "float32"  # float32 | float16
    kind: str = "auto"  # exact | hnsw | ivf | ivfpq | auto (exact below `ann_threshold`, ivfpq from `ivfpq_threshold`)
    ann_threshold: int = 200_000
    ivfpq_threshold: int = 5_000_000
    embed_batch_size: int = 64
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0  # 0 = 4 * sqrt(N)
    ivf_nprobe: int = 32
    ivfpq_factory: str = ""  # a FAISS index_factory string; "" = OPQ{m},IVF{nlist}_HNSW32,PQ{m}
    pq_m: int = 0  # bytes per vector in the PQ code; 0 = dim / 8 (32 for 256-d), rounded to a divisor of dim
    opq: bool = False  # rotate before PQ (OPQ): codes fit anisotropic embeddings better, ~5x the training time
    ivfpq_nprobe: int = 64
    rerank: int = 512  # shortlist re-ranked exactly against the stored embeddings (recall@10 0.98 on 1M clustered)
    train_size: int = 0  # training sample; 0 = 64 points per list (at least 10,000), never more than the gallery


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Answering queries: the HTTP server and page, and `search` on the command line (`default_k`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10  # results per query when none is asked for (CLI `search`, the API, the page)
    max_query_chars: int = 512
    max_k: int = 100
    thumbnail_size: int = 256
    max_request_bytes: int = 1 << 20  # larger request bodies get a 413 before they are read
    max_upload_bytes: int = 20 << 20  # an image uploaded to search with (a phone photo is ~2-12 MB)


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "index": IndexConfig,
    "serve": ServeConfig,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole recipe: one frozen section per concern."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a JSON object of sections, got {type(values).__name__}")
        unknown = set(values) - set(_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            section_values = values.get(name, {})
            if not isinstance(section_values, dict):
                raise ConfigError(f"config section '{name}' must be a JSON object, got {type(section_values).__name__}")
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(section_values) - known
            if bad:
                raise ConfigError(f"unknown keys in config section '{name}': {sorted(bad)}")
            for field, value in section_values.items():
                check_value(name, field, value)
            sections[name] = section_cls(**section_values)
        return cls(**sections)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """A config from a JSON file; a file that is not UTF-8 JSON is a one-line `ConfigError` naming it."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
        try:
            return cls.from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_preset(cls, name: str) -> "Config":
        """A named recipe from `dual_encoder/presets/<name>.json`, or a path to such a file."""
        path = Path(name)
        if not path.is_file():
            path = PRESETS_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{name}'; choose one of {list_presets()} or a JSON file")
        return cls.load(path)

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        """Apply `key=value` strings; `key` is `section.field` or a field name unique across sections.

        Values are parsed as JSON where they parse (numbers, true/false, null), else kept as strings.
        """
        values = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            key = key.strip()
            if key.startswith("model.pretrained."):  # a field of the nested pretrained section
                nested = dict(values["model"].get("pretrained") or {})
                nested[key.split(".", 2)[2]] = _parse_value(raw.strip())
                values["model"]["pretrained"] = nested
                continue
            section, field = _resolve_key(key)
            values[section][field] = _parse_value(raw.strip())
        return Config.from_dict(values)


def _resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, field = key.split(".", 1)
        if section not in _SECTIONS or field not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            raise ConfigError(f"unknown config key '{key}'")
        return section, field
    owners = [s for s, c in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(c)}]
    if not owners:
        raise ConfigError(f"unknown config key '{key}'")
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {[f'{s}.{key}' for s in owners]}")
    return owners[0], key


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# --- value checks: each field's type comes from its annotation; ranges and choices from this table ------------


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a field accepts beyond its type: bounds (inclusive `low`/`high`, or exclusive) or a set of choices.

    The choices mirror the registries of the model, loss and index code (a test keeps them equal), so a bad
    name is caught when the config is read, not after a dataset is loaded.
    """

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # `low` itself not allowed
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))


_POSITIVE, _NON_NEGATIVE = Allowed(low=1), Allowed(low=0)
_FRACTION = Allowed(low=0, high=1)
ALLOWED: dict[str, Allowed] = {
    "data.validation_fraction": Allowed(low=0, high=1, high_open=True),
    "data.split_seed": _NON_NEGATIVE,
    "data.shard_size": _POSITIVE,
    "data.max_image_pixels": _POSITIVE,
    "model.image_backbone": Allowed(choices=("small_cnn", "small_cnn_pooled", "small_cnn_detectors", "xception", "efficientnetv2_b0", "mobilenetv3_small", "resnet50")),
    "model.image_size": Allowed(low=16),
    "model.image_width": _POSITIVE,
    "model.text_backbone": Allowed(choices=("small_transformer", "keras_hub", "tf_hub")),
    "model.text_pooling": Allowed(choices=("cls", "mean")),
    "model.sequence_length": Allowed(low=2),
    "model.vocabulary_size": Allowed(low=4),
    "model.text_width": _POSITIVE,
    "model.text_layers": _POSITIVE,
    "model.text_heads": _POSITIVE,
    "model.embed_dim": _POSITIVE,
    "model.num_projection_layers": _NON_NEGATIVE,
    "model.dropout": Allowed(low=0, high=1, high_open=True),
    "model.loss": Allowed(choices=("clip", "soft_target", "siglip")),
    "model.temperature": Allowed(low=0, low_open=True),
    "model.max_logit_scale": Allowed(low=0, low_open=True),
    "train.batch_size": _POSITIVE,
    "train.captions_per_image": _POSITIVE,
    "train.mixed_precision_dtype": Allowed(choices=("float16", "bfloat16")),
    "train.epochs": _POSITIVE,
    "train.learning_rate": Allowed(low=0, low_open=True),
    "train.weight_decay": _NON_NEGATIVE,
    "train.warmup_fraction": _FRACTION,
    "train.min_learning_rate_ratio": _FRACTION,
    "train.seed": _NON_NEGATIVE,
    "train.early_stopping_patience": _NON_NEGATIVE,
    "train.reduce_lr_patience": _NON_NEGATIVE,
    "train.reduce_lr_factor": Allowed(low=0, high=1, low_open=True, high_open=True),
    "index.dtype": Allowed(choices=("float32", "float16")),
    "index.kind": Allowed(choices=("exact", "hnsw", "ivf", "ivfpq", "auto")),
    "index.ann_threshold": _NON_NEGATIVE,
    "index.ivfpq_threshold": _NON_NEGATIVE,
    "index.pq_m": _NON_NEGATIVE,
    "index.ivfpq_nprobe": _POSITIVE,
    "index.rerank": _NON_NEGATIVE,
    "index.train_size": _NON_NEGATIVE,
    "index.embed_batch_size": _POSITIVE,
    "index.hnsw_m": Allowed(low=2),
    "index.hnsw_ef_search": _POSITIVE,
    "index.ivf_nlist": _NON_NEGATIVE,
    "index.ivf_nprobe": _POSITIVE,
    "serve.port": Allowed(low=1, high=65535),
    "serve.default_k": _POSITIVE,
    "serve.max_query_chars": _POSITIVE,
    "serve.max_k": _POSITIVE,
    "serve.thumbnail_size": Allowed(low=16),
    "serve.max_request_bytes": Allowed(low=1024),
    "serve.max_upload_bytes": Allowed(low=1024),
}


def check_value(section: str, field: str, value: Any) -> None:
    """Raise a one-line `ConfigError` naming `section.field` and what it allows, unless `value` fits the
    field's annotated type and its entry in `ALLOWED`."""
    key = f"{section}.{field}"
    if key == "model.pretrained":
        _check_pretrained(value)
        return
    annotation = typing.get_type_hints(_SECTIONS[section])[field]
    optional = type(None) in typing.get_args(annotation)
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    allowed = ALLOWED.get(key, Allowed())
    if value is None and optional:
        return
    if not _has_type(value, base) or not allowed.admits(value):
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        if allowed.choices:
            wanted = allowed.describe()
        elif allowed.describe():
            wanted += " " + allowed.describe()
        raise ConfigError(f"{key}={json.dumps(value)} is not allowed: expected {wanted}{' or null' if optional else ''}")


def _check_pretrained(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"model.pretrained={json.dumps(value)} is not allowed: expected an object or null")
    fields = {f.name: f for f in dataclasses.fields(PretrainedConfig)}
    unknown = set(value) - set(fields)
    if unknown:
        raise ConfigError(f"unknown keys in model.pretrained: {sorted(unknown)}")
    if not isinstance(value.get("preset", ""), str) or not value.get("preset"):
        raise ConfigError("model.pretrained.preset must be a KerasHub preset name or a local preset folder")
    if value.get("heads", "none") not in PRETRAINED_HEADS:
        raise ConfigError(f"model.pretrained.heads={json.dumps(value.get('heads'))} is not allowed: expected one of {', '.join(PRETRAINED_HEADS)}")
    length = value.get("sequence_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise ConfigError(f"model.pretrained.sequence_length={json.dumps(length)} is not allowed: expected an integer >= 2 or null")


def _has_type(value: Any, base: type) -> bool:
    """JSON-parsed `value` fits `base` (bools are not numbers; an int is a fine float; no NaN or infinity)."""
    if base is bool or isinstance(value, bool):
        return base is bool and isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, base)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
