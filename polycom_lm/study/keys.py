"""Checking the keys of study files: dotted config keys against the config schema, and the study file's
own sections against their allowed keys, with one-line errors that name the study file and the closest
valid key."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from polycom_lm.config import Config
from polycom_lm.errors import ConfigError


def config_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the config schema → its annotation (sections included)."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        dotted = f"{prefix}{item.name}"
        keys[dotted] = hints[item.name]
        if dataclasses.is_dataclass(hints[item.name]):
            keys.update(config_keys(hints[item.name], dotted + "."))
    return keys


def check_key(key: Any, where: str, study: Path) -> str:
    """`key` if it names a config setting, else a one-line ConfigError with the closest valid key."""
    valid = config_keys()
    if isinstance(key, str) and key in valid:
        if dataclasses.is_dataclass(valid[key]):
            raise ConfigError(f"{study}: {where} {key!r} is a config section, not a setting; name a key inside it")
        return key
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{study}: {where} {key!r} is not a config key{hint}; keys are dotted paths of the config schema, "
        f"e.g. model.activation, training.seed, optimizer.lr"
    )


def mapping(value: Any, where: str, study: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{study}: {where} must be a mapping, got {value!r}")
    return value


def overrides(value: Any, where: str, study: Path) -> dict[str, Any]:
    """A mapping of dotted config keys to values, every key checked."""
    return {check_key(key, f"{where} key", study): item for key, item in mapping(value, where, study).items()}


def only(section: dict, allowed: tuple[str, ...], where: str, study: Path) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{study}: unknown {where} key {key!r}{hint}; valid: {', '.join(allowed)}")
