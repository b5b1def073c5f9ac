"""Converting a plain mapping (as read from YAML) into the config dataclasses, checking every key and
type: an unknown key gets a did-you-mean and the list of valid keys, a wrong type names what was expected,
each with the file (or override) the value came from."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Optional, Union

from polycom_lm.errors import ConfigError

def from_dict(cls: type, data: Any, origins: Optional[dict[str, str]] = None, prefix: str = "") -> Any:
    """Convert a mapping into dataclass `cls`, checking keys and types recursively."""
    origins = origins or {}
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}{_origin(origins, prefix.rstrip('.'))}: expected a mapping of {cls.__name__} keys, "
            f"got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {dotted!r}{_origin(origins, dotted)}{hint}; valid keys under {where}: "
                f"{', '.join(valid)}"
            )
        kwargs[key] = _convert(hints[key], value, dotted, origins)
    return cls(**kwargs)


def _origin(origins: dict[str, str], dotted: str) -> str:
    while dotted:
        if dotted in origins:
            return f" in {origins[dotted]}"
        dotted = dotted.rpartition(".")[0]
    return ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return f"mapping to {_type_name(typing.get_args(annotation)[1])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(annotation: Any, value: Any, dotted: str, origins: dict[str, str]) -> Any:
    def fail() -> ConfigError:
        return ConfigError(
            f"{dotted}{_origin(origins, dotted)}: expected {_type_name(annotation)}, got {value!r}"
        )

    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, origins, dotted + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise fail()
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, dotted, origins)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item_type,) = typing.get_args(annotation)
        return [_convert(item_type, item, f"{dotted}[{i}]", origins) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, item_type = typing.get_args(annotation)
        return {str(k): _convert(item_type, v, f"{dotted}.{k}", origins) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise fail() from None
            if number.is_integer():
                return int(number)
        raise fail()
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail()
    if annotation is Any:
        return value
    raise TypeError(f"config field {dotted} has an unsupported annotation {annotation!r}")
