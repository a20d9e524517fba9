"""Typed, frozen configuration sections, presets as JSON, and `key=value` overrides.

The `model` section is a `ModelConfig` (`dual_encoder.model_config`): a section per tower family, the heads and
the loss, whose fields are the `DualEncoder` constructor arguments, so a training run and the model directory it
writes share one schema. Configs written before the model had sections (format 1) are migrated on read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from dual_encoder.config_values import (
    FRACTION, NON_NEGATIVE, POSITIVE, Allowed, ConfigError, build_section, field_names, unknown_keys_message,
)  # fmt: skip
from dual_encoder.model_config import (
    FLAT_DEFAULTS, SECTIONS as MODEL_SECTIONS, HeadsConfig, LossConfig, ModelConfig, PairedConfig, family_of,
    flat_targets, is_flat, migrate_flat, section_class,
)  # fmt: skip

__all__ = ["Allowed", "ALLOWED", "Config", "ConfigError", "DataConfig", "HeadsConfig", "IndexConfig", "LossConfig",
           "ModelConfig", "PairedConfig", "ServeConfig", "TrainConfig", "list_presets"]  # fmt: skip

PRESETS_DIR = Path(__file__).parent / "presets"
CONFIG_FORMAT = 2  # 1: the model section was flat (every tower's fields in one); 2: tower, heads and loss sections


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How `prepare` splits and shards a dataset, and how the input pipeline reads it."""

    validation_fraction: float = 0.1
    split_seed: int = 0
    shard_size: int = 1000
    max_image_pixels: int = 64_000_000


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
    pq_m: int = 0  # bytes per vector in the PQ code; 0 = dim / 8 (32 for 256-d), dim / 4 from 2M vectors
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


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "index": IndexConfig, "serve": ServeConfig}  # besides `model`
_ORDER = ("data", "model", "train", "index", "serve")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole recipe: one frozen section per concern."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": CONFIG_FORMAT, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """A config from its JSON form; one of format 1 (a flat model section, `train.gather_negatives`) is
        migrated."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a JSON object of sections, got {type(values).__name__}")
        values = dict(values)
        version = values.pop("format_version", 1)
        if version not in (1, CONFIG_FORMAT):
            raise ConfigError(f"unsupported config format_version {version!r}: this version reads 1 and {CONFIG_FORMAT}")
        unknown = set(values) - set(_ORDER)
        if unknown:
            raise ConfigError(f"unknown config sections: {sorted(unknown)}; a config has {', '.join(_ORDER)}")
        for name in _ORDER:
            if not isinstance(values.get(name, {}), dict):
                raise ConfigError(f"config section '{name}' must be a JSON object, got {type(values[name]).__name__}")
        values = _migrate(values)
        sections = {name: build_section(section_cls, values.get(name, {}), name, _allowed(name))
                    for name, section_cls in _SECTIONS.items()}  # fmt: skip
        return cls(model=ModelConfig.from_dict(values.get("model", {})), **sections)

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
        """Apply `key=value` strings (see `resolve_key` for the keys).

        Values are parsed as JSON where they parse (numbers, true/false, null), else kept as strings. A
        `backbone` naming another family gives its tower that family's section, at its defaults: backbones are
        applied first, so the other keys of the same call address the new family.
        """
        parsed = []
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override '{item}' is not of the form key=value")
            parsed.append((key.strip(), _parse_value(raw.strip())))
        parsed.sort(key=lambda pair: not pair[0].endswith("backbone"))
        values = self.to_dict()
        for key, value in parsed:
            for path in resolve_key(values, key):
                _assign(values, path, value, key)
        return Config.from_dict(values)


def _allowed(section: str) -> dict[str, Allowed]:
    return {key.split(".", 1)[1]: allowed for key, allowed in ALLOWED.items() if key.startswith(section + ".")}


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the flat model section into sections, `train.gather_negatives` into the loss's."""
    model, train = values.get("model", {}), values.get("train", {})
    if is_flat(model):
        model = migrate_flat(model)
    if "gather_negatives" in train:
        train = {k: v for k, v in train.items() if k != "gather_negatives"}
        model = {**model, "loss": {**(model.get("loss") or {}), "gather_negatives": values["train"]["gather_negatives"]}}
    return {**values, "model": model, "train": train}


def resolve_key(values: dict[str, Any], key: str) -> list[tuple[str, ...]]:
    """Where an override key points in a config's dict form: paths like ("train", "epochs") or
    ("model", "text", "width").

    Keys: `section.field` (`train.epochs`, `index.kind`); a model section's field, with or without `model.`
    (`text.width`, `model.image.size`, `heads.embed_dim`, `loss.name`, `paired.preset`); a field name unique among
    data, train, index and serve (`epochs`); and the flat model names of format 1 as aliases (`image_size` ->
    `image.size`, `embed_dim` -> `heads.embed_dim`, `loss` -> `loss.name`, `dropout` -> `heads.dropout` and the
    small transformer's, `model.pretrained.preset` -> `paired.preset`, `gather_negatives` -> `loss.gather_negatives`).
    """
    parts = key.split(".")
    prefixed = parts[0] == "model" and len(parts) > 1
    if prefixed:
        parts = parts[1:]
    if parts[0] == "pretrained":  # format 1's nested section
        if parts[1:] == ["heads"]:
            raise ConfigError(f"'{key}' is now heads.kind (projection | second_order | none)")
        parts = ["paired", *parts[1:]]
    if len(parts) == 2 and parts[0] in MODEL_SECTIONS:
        return [("model", *parts)]
    if parts == ["paired"]:
        return [("model", "paired")]
    if len(parts) == 2 and parts[0] in _SECTIONS and not prefixed:
        if parts == ["train", "gather_negatives"]:
            return [("model", "loss", "gather_negatives")]
        if parts[1] not in field_names(_SECTIONS[parts[0]]):
            raise ConfigError(unknown_keys_message(parts[0], [parts[1]], field_names(_SECTIONS[parts[0]])))
        return [tuple(parts)]
    if len(parts) == 1:
        return _resolve_name(values, parts[0], key)
    sections = [*_SECTIONS, *MODEL_SECTIONS]
    raise ConfigError(f"unknown config key '{key}': give section.key, with a section of {', '.join(sections)}")


def _resolve_name(values: dict[str, Any], name: str, key: str) -> list[tuple[str, ...]]:
    if name in FLAT_DEFAULTS or name == "gather_negatives":  # format 1's flat model names
        if name == "gather_negatives":  # a train setting in format 1
            return [("model", "loss", "gather_negatives")]
        targets = [("model", *target) for target in flat_targets(values["model"], name)]
        if not targets:
            raise ConfigError(f"config key '{key}' (a flat name of format 1) fits none of this model's sections; "
                              f"give section.key: {', '.join(MODEL_SECTIONS)}")  # fmt: skip
        return targets
    owners = [s for s, c in _SECTIONS.items() if name in field_names(c)]
    if not owners:
        raise ConfigError(f"unknown config key '{key}': give section.key, with a section of "
                          f"{', '.join([*_SECTIONS, *MODEL_SECTIONS])}")  # fmt: skip
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {[f'{s}.{name}' for s in owners]}")
    return [(owners[0], name)]


def _assign(values: dict[str, Any], path: tuple[str, ...], value: Any, key: str) -> None:
    if path[0] != "model":
        values[path[0]][path[1]] = value
        return
    model = values["model"]
    if len(path) == 2:  # paired=null: back to separate towers (at their defaults)
        if value is not None:
            raise ConfigError(f"'{key}' takes null (separate towers again) or a key: paired.preset=…")
        model.update(paired=None, image=None, text=None)
        return
    _, name, field = path
    if name in ("image", "text") and model.get("paired") is not None:
        raise ConfigError(f"'{key}': this model's towers come from model.paired (paired.preset, paired.sequence_length, "
                          f"paired.{name}_trainable); set paired=null to give it separate towers")  # fmt: skip
    if name == "paired" and model.get("paired") is None:  # the preset supplies both towers
        model.update(paired={}, image=None, text=None)
    section = dict(model.get(name) or {})
    section_cls = section_class(name, section)
    if field == "backbone" and name in ("image", "text"):
        if family_of(name, value) is not section_cls:
            section = {}  # another family: its own section, at its defaults
    elif field not in field_names(section_cls):
        what = section_cls.describe() if hasattr(section_cls, "describe") else ""
        raise ConfigError(unknown_keys_message(f"model.{name}", [field], field_names(section_cls), what))
    section[field] = value
    model[name] = section


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# --- value ranges and choices of the data, train, index and serve sections (the model's own declare theirs) ---

ALLOWED: dict[str, Allowed] = {
    "data.validation_fraction": Allowed(low=0, high=1, high_open=True),
    "data.split_seed": NON_NEGATIVE,
    "data.shard_size": POSITIVE,
    "data.max_image_pixels": POSITIVE,
    "train.batch_size": POSITIVE,
    "train.captions_per_image": POSITIVE,
    "train.mixed_precision_dtype": Allowed(choices=("float16", "bfloat16")),
    "train.epochs": POSITIVE,
    "train.learning_rate": Allowed(low=0, low_open=True),
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_fraction": FRACTION,
    "train.min_learning_rate_ratio": FRACTION,
    "train.seed": NON_NEGATIVE,
    "train.early_stopping_patience": NON_NEGATIVE,
    "train.reduce_lr_patience": NON_NEGATIVE,
    "train.reduce_lr_factor": Allowed(low=0, high=1, low_open=True, high_open=True),
    "index.dtype": Allowed(choices=("float32", "float16")),
    "index.kind": Allowed(choices=("exact", "hnsw", "ivf", "ivfpq", "auto")),
    "index.ann_threshold": NON_NEGATIVE,
    "index.ivfpq_threshold": NON_NEGATIVE,
    "index.pq_m": NON_NEGATIVE,
    "index.ivfpq_nprobe": POSITIVE,
    "index.rerank": NON_NEGATIVE,
    "index.train_size": NON_NEGATIVE,
    "index.embed_batch_size": POSITIVE,
    "index.hnsw_m": Allowed(low=2),
    "index.hnsw_ef_search": POSITIVE,
    "index.ivf_nlist": NON_NEGATIVE,
    "index.ivf_nprobe": POSITIVE,
    "serve.port": Allowed(low=1, high=65535),
    "serve.default_k": POSITIVE,
    "serve.max_query_chars": POSITIVE,
    "serve.max_k": POSITIVE,
    "serve.thumbnail_size": Allowed(low=16),
    "serve.max_request_bytes": Allowed(low=1024),
    "serve.max_upload_bytes": Allowed(low=1024),
}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
