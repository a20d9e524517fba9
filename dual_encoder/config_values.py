"""What a config value may be: the one `ConfigError`, `Allowed` bounds and choices, and the one check that builds
a frozen section from JSON values (known keys, each value of its field's type and range)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Optional

from dual_encoder.errors import DualEncoderError


class ConfigError(DualEncoderError, ValueError):
    """An unknown preset, section or key, or a malformed override."""


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


POSITIVE, NON_NEGATIVE = Allowed(low=1), Allowed(low=0)
FRACTION = Allowed(low=0, high=1)
DROPOUT = Allowed(low=0, high=1, high_open=True)


def field_names(section_cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section_cls)]


def check_value(key: str, annotation: Any, allowed: Allowed, value: Any) -> None:
    """Raise a one-line `ConfigError` naming `key` and what it allows, unless `value` fits `annotation` and
    `allowed`."""
    optional = type(None) in typing.get_args(annotation)
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if value is None and optional:
        return
    if not _has_type(value, base) or not allowed.admits(value):
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        if allowed.choices:
            wanted = allowed.describe()
        elif allowed.describe():
            wanted += " " + allowed.describe()
        raise ConfigError(f"{key}={json.dumps(value)} is not allowed: expected {wanted}{' or null' if optional else ''}")


def build_section(section_cls: type, values: Any, where: str, allowed: dict[str, Allowed], what: str = ""):
    """`section_cls(**values)` after checking every key and value; `where` names the section in errors
    (`model.text`), `what` says which kind it is (`the small_transformer text tower`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a JSON object, got {type(values).__name__}")
    known = field_names(section_cls)
    bad = sorted(set(values) - set(known))
    if bad:
        raise ConfigError(unknown_keys_message(where, bad, known, what))
    hints = typing.get_type_hints(section_cls)
    for name, value in values.items():
        check_value(f"{where}.{name}", hints[name], allowed.get(name, Allowed()), value)
    return section_cls(**values)


def unknown_keys_message(where: str, bad: list[str], known: list[str], what: str = "") -> str:
    owner = f"{where} ({what})" if what else where
    return f"unknown keys in config section '{where}': {bad}; {owner} has {', '.join(known)}"


def _has_type(value: Any, base: type) -> bool:
    """JSON-parsed `value` fits `base` (bools are not numbers; an int is a fine float; no NaN or infinity)."""
    if base is bool or isinstance(value, bool):
        return base is bool and isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, base)
