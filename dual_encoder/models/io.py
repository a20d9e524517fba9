"""Model directories: save a DualEncoder with everything it needs to load offline, load it, fingerprint it.

Layout: `config.json` (format version, the ModelConfig sections, where its assets live, the image size),
`model.weights.h5`, `vocabulary.json` (small_transformer), `assets/` (a KerasHub preset or TF-Hub SavedModels),
`fingerprint.json` (sha256 over every other file). Folders of format 1 (a flat ModelConfig) load too: their
config is migrated on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from dual_encoder.atomic import MODEL, atomic_directory
from dual_encoder.config_values import ConfigError
from dual_encoder.errors import DualEncoderError
from dual_encoder.index.errors import ModelMismatchError  # TF-free leaves of the index package
from dual_encoder.index.store import ModelRecord
from dual_encoder.model_config import FLAT_DEFAULTS, ModelConfig, flat_targets
from dual_encoder.models.dual_encoder import DualEncoder

FORMAT_VERSION = 2  # 1: a flat ModelConfig; 2: its sections (`dual_encoder.model_config`) and the image size
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
VOCABULARY_FILE = "vocabulary.json"
FINGERPRINT_FILE = "fingerprint.json"
ASSETS_DIR = "assets"


class ModelDirectoryError(DualEncoderError):
    """A model directory is missing, incomplete, modified since it was saved, or in the way of a save."""


def save_model(model: DualEncoder, directory: str | Path, overwrite: bool = True) -> Path:
    """Write `model` to `directory` (built in a temporary sibling, then renamed into place).

    With `overwrite`, an existing model directory there is replaced; any other non-empty directory is left
    alone (error).
    """
    directory = Path(directory)
    # `train` replaces its model folder without asking (inside its locked run folder); `model create` asks.
    with atomic_directory(directory, MODEL, overwrite=overwrite, error=ModelDirectoryError) as staging:
        assets = model.text_encoder.save_assets(staging / ASSETS_DIR)
        section = model.model_config.tower_section_name("text")
        config = {
            "format_version": FORMAT_VERSION,
            "model": model.model_config.to_dict(),
            # `section.field`s of the config that load from files inside this directory instead of their saved value.
            "assets": {f"{section}.{field}": f"{ASSETS_DIR}/{name}" for field, name in assets.items()},
            "image_size": int(model.image_size),  # what the image tower takes (a paired preset's own), for readers without TF
        }
        _write_json(staging / CONFIG_FILE, config)
        if model.vocabulary is not None:
            _write_json(staging / VOCABULARY_FILE, list(model.vocabulary))
        model.save_weights(staging / WEIGHTS_FILE)
        _write_json(staging / FINGERPRINT_FILE, {"sha256": _hash_directory(staging)})
    return directory


def resolve_model_dir(directory: str | Path) -> Path:
    """A training run folder stands for its best model (`<run>/model`); a model folder for itself."""
    directory = Path(directory)
    nested = directory / "model"
    return nested if not (directory / FINGERPRINT_FILE).is_file() and (nested / FINGERPRINT_FILE).is_file() else directory


def load_model(directory: str | Path) -> DualEncoder:
    """Load a model saved by `save_model` (or a run folder's best model), with no network access; verifies its
    fingerprint first."""
    directory = resolve_model_dir(directory)
    stored = model_fingerprint(directory)
    actual = _hash_directory(directory)
    if actual != stored:
        raise ModelDirectoryError(f"{directory} was modified after it was saved (fingerprint mismatch)")
    config, assets = read_model_config(directory)
    # The weights file holds every weight, so nothing is fetched: no ImageNet download, local assets only.
    local = {key: str(directory / path) for key, path in assets.items()}
    config = config.replace({**local, **({"image.weights": None} if config.image is not None else {})})
    vocabulary_path = directory / VOCABULARY_FILE
    vocabulary = json.loads(vocabulary_path.read_text(encoding="utf-8")) if vocabulary_path.is_file() else None
    model = DualEncoder(vocabulary=vocabulary, **config.to_dict())
    model.load_weights(directory / WEIGHTS_FILE)
    return model


def load_checked_model(directory: str | Path, expected: Optional[ModelRecord] = None) -> tuple[DualEncoder, ModelRecord]:
    """`(model, ModelRecord)` for `directory`; refuses, before building anything, a model whose fingerprint
    differs from `expected`'s (the model an index was built with)."""
    fingerprint = model_fingerprint(directory)
    if expected is not None and fingerprint != expected.fingerprint:
        raise ModelMismatchError(
            f"model {directory} (fingerprint {fingerprint[:12]}) is not the model the index was built with "
            f"({expected.directory}, fingerprint {expected.fingerprint[:12]}): fingerprint mismatch"
        )
    return load_model(directory), ModelRecord(os.path.abspath(directory), fingerprint)


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict[str, str]]:
    """A model folder's config (format 1 migrated) and its assets: `section.field` -> a path inside the folder."""
    directory = resolve_model_dir(directory)
    saved = _read_config_file(directory)
    version = saved.get("format_version")
    try:
        config = ModelConfig.from_dict(saved["model"])
    except (ConfigError, KeyError, TypeError) as error:
        raise ModelDirectoryError(f"{directory}/{CONFIG_FILE} does not match this version's ModelConfig: {error}") from None
    assets = saved.get("assets", {})
    if version == 1:  # flat names: text_preset, text_preprocessor, pretrained.preset
        assets = {_section_key(config, key): path for key, path in assets.items()}
    return config, assets


def model_image_size(directory: str | Path) -> int:
    """The side of the square images the model's image tower takes, read from its config (no model is built)."""
    directory = resolve_model_dir(directory)
    saved = _read_config_file(directory)
    if saved.get("format_version") == 1:
        return int(saved["model"].get("image_size", FLAT_DEFAULTS["image_size"]))
    return int(saved["image_size"])


def _read_config_file(directory: Path) -> dict:
    saved = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    if saved.get("format_version") not in (1, FORMAT_VERSION):
        raise ModelDirectoryError(f"{directory}: unsupported model format {saved.get('format_version')!r}")
    return saved


def _section_key(config: ModelConfig, flat_key: str) -> str:
    if flat_key == "pretrained.preset":
        return "paired.preset"
    ((section, field),) = flat_targets(config.to_dict(), flat_key)
    return f"{section}.{field}"


def model_fingerprint(directory: str | Path) -> str:
    """The sha256 recorded when the model directory was saved (over its config, weights and assets)."""
    directory = resolve_model_dir(directory)
    path = directory / FINGERPRINT_FILE
    if not path.is_file():
        raise ModelDirectoryError(f"{directory} is not a saved model directory (no {FINGERPRINT_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))["sha256"]


def _hash_directory(directory: Path) -> str:
    """sha256 over the relative path and bytes of every file except the fingerprint itself."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != FINGERPRINT_FILE)
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
