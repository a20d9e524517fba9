"""Run folders: checked and locked before training writes anything into them.

A run folder records what it was trained with in `run.json` (its config and the prepared dataset's
fingerprint). Re-running `train` on it resumes only when both are the same; otherwise the refusal names what
differs, and `restart` starts the run afresh in that folder. A folder that is not a run folder is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from dual_encoder.atomic import RUN, check_replaceable, writer_lock, write_file_atomically
from dual_encoder.config import Config, ConfigError
from dual_encoder.data import tfrecords
from dual_encoder.errors import DualEncoderError

CONFIG_FILE = "config.json"
_COMPARED_SECTIONS = ("model", "train")  # what shapes the weights; data/index/serve settings do not
_RUN_OUTPUTS = (RUN.marker, CONFIG_FILE, "history.json", "curves.png", "backup", "logs", "model")


class RunFolderError(DualEncoderError):
    """A run folder cannot be used: not a run folder, or its config or dataset differs from this run's."""


def dataset_fingerprint(data_dir: str | Path) -> str:
    """The prepared dataset's fingerprint (of its inputs and settings), or a hash of its manifest if it has none."""
    manifest = tfrecords.read_manifest(Path(data_dir))
    fingerprint = manifest.get("fingerprint")
    return fingerprint if isinstance(fingerprint, str) else hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def claim_run_folder(
    run_dir: Path, config: Config, data_dir: Path, *, restart: bool = False, chief: bool = True
) -> Iterator[None]:
    """Check `run_dir`, then hold its writer lock while training runs; records config and dataset on entry.

    Nothing in `run_dir` is written until the checks pass. Workers other than the chief write only their own
    backups and take no lock (the chief holds it for the whole cluster).
    """
    if not chief:
        yield
        return
    fingerprint = dataset_fingerprint(data_dir)
    check_run_folder(run_dir, config, fingerprint, restart=restart)  # before the lock file is made
    with writer_lock(run_dir):
        check_run_folder(run_dir, config, fingerprint, restart=restart)  # another run may have finished meanwhile
        if restart:
            _clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {**RUN.stamp(), "config": config.to_dict(), "dataset": {"dir": str(Path(data_dir).absolute()), "fingerprint": fingerprint}}
        write_file_atomically(run_dir / CONFIG_FILE, config.to_json() + "\n")
        write_file_atomically(run_dir / RUN.marker, json.dumps(record, indent=2, sort_keys=True) + "\n")
        yield


def check_run_folder(run_dir: Path, config: Config, fingerprint: str, *, restart: bool = False) -> None:
    """Raise `RunFolderError` unless `run_dir` is new, empty, or a run folder of ours that this run may continue
    (same model and train settings, same dataset) or, with `restart`, start afresh."""
    check_replaceable(run_dir, RUN, overwrite=True, error=RunFolderError)
    if restart or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    recorded_config, recorded_dataset = _recorded(run_dir)
    differences = config_differences(recorded_config, config.to_dict())
    if differences:
        raise RunFolderError(
            f"{run_dir} holds a run with another config ({'; '.join(differences)}): "
            "pass --restart to start it afresh there, or choose another --output"
        )
    if recorded_dataset is None:
        print(f"note: {run_dir} predates dataset fingerprints; resuming without checking the dataset", file=sys.stderr)
    elif recorded_dataset.get("fingerprint") != fingerprint:
        raise RunFolderError(
            f"{run_dir} was trained on another dataset ({recorded_dataset.get('dir')}, fingerprint "
            f"{str(recorded_dataset.get('fingerprint'))[:12]}, not {fingerprint[:12]}): "
            "pass --restart to start it afresh there, or choose another --output"
        )


def config_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`section.key old -> new` for every model and train setting that differs (`model.heads.embed_dim 128 -> 64`)."""
    old = _flatten({section: recorded.get(section, {}) for section in _COMPARED_SECTIONS})
    new = _flatten({section: current.get(section, {}) for section in _COMPARED_SECTIONS})
    return [
        f"{key} {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new), key=lambda k: (k.split(".")[0] != "model", k))
        if old.get(key) != new.get(key)
    ]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"model.text.width": 64, …}; a section that is null (model.image with a paired preset)
    stays one key."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _recorded(run_dir: Path) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The config (with today's defaults for keys it lacks) and dataset a run folder records; a folder written
    before `run.json` existed has only its `config.json`, and no dataset."""
    run_file = run_dir / RUN.marker
    try:
        if run_file.is_file():
            record = json.loads(run_file.read_text(encoding="utf-8"))
            config, dataset = record.get("config", {}), record.get("dataset")
        else:
            config, dataset = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")), None
        if not isinstance(config, dict):
            raise ValueError("its config is not an object")
    except (ValueError, AttributeError) as error:  # bad JSON, or JSON of the wrong shape
        raise RunFolderError(f"{run_dir} has an unreadable run record ({error}): pass --restart to start afresh") from None
    try:
        config = Config.from_dict(config).to_dict()
    except (ConfigError, TypeError):
        pass  # compared as written: every differing key is named
    return config, dataset


def _clear(run_dir: Path) -> None:
    """Remove what a run wrote (and nothing else) so `--restart` starts from scratch."""
    for name in _RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
