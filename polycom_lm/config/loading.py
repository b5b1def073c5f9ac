"""Reading experiment configs: a YAML file, its `base:` chain (one file or a list, merged in order, later
wins), dotted `key=value` overrides, then conversion into the typed `Config` (`conversion.py`), checking
every key and type on the way. Errors are `ConfigError`s that name the key, the file it came from and what
would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml

from polycom_lm.config.conversion import from_dict
from polycom_lm.config.schema import Config
from polycom_lm.errors import ConfigError, first_line

OVERRIDE_ORIGIN = "command-line override"
# A config is a few kilobytes. These bounds turn hostile YAML (a "billion laughs" of nested aliases, a
# recursive alias, a huge or absurdly deep document) into a one-line error instead of a hang, a
# MemoryError or a RecursionError.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000  # values after expanding aliases
MAX_CONFIG_DEPTH = 64


def safe_yaml_load(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` within the bounds above; ConfigError naming `where` otherwise."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters is too large for a config (limit {MAX_CONFIG_BYTES:,})")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({first_line(error)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None
    _check_expansion(data, where)
    return data


def _check_expansion(data: Any, where: str) -> None:
    """Walk `data` as the config code will (aliases expanded): refuse cycles, depth and size beyond bounds."""
    count = 0
    active: set[int] = set()

    def walk(node: Any, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeated inside "
                f"each other); a config is a few hundred values"
            )
        if not isinstance(node, (dict, list)):
            return
        if id(node) in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive structure is not a config)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels; a config is a few levels deep")
        active.add(id(node))
        for child in node.values() if isinstance(node, dict) else node:
            walk(child, depth + 1)
        active.discard(id(node))

    walk(data, 0)


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Load `path` (following `base:` files), apply dotted `key=value` overrides, return a typed Config."""
    raw, origins = _load_yaml_tree(Path(path), chain=())
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
        origins[key] = OVERRIDE_ORIGIN
    return from_dict(Config, raw, origins=origins)


def config_from_dict(raw: dict[str, Any], overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from an in-memory mapping (as loaded from YAML), with optional overrides."""
    raw = _deep_copy(raw)
    origins: dict[str, str] = {}
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
        origins[key] = OVERRIDE_ORIGIN
    return from_dict(Config, raw, origins=origins)


def parse_override(text: str) -> tuple[str, Any]:
    """`"model.activation=polynorm"` → `("model.activation", "polynorm")`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. model.activation=polynorm)")
    key, _, value_text = text.partition("=")
    key = key.strip().removeprefix("--")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected a dotted key like training.max_steps")
    value = safe_yaml_load(value_text, f"override {text!r}") if value_text.strip() else ""
    return key, value


def _load_yaml_tree(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = safe_yaml_load(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if bases is not None:
        base_list = [bases] if isinstance(bases, str) else bases
        if not isinstance(base_list, list) or not all(isinstance(b, str) for b in base_list):
            raise ConfigError(f"{path}: 'base' must be a file path or a list of file paths, got {bases!r}")
        for base in base_list:
            base_data, base_origins = _load_yaml_tree(path.parent / base, (*chain, resolved))
            _deep_merge(merged, base_data)
            origins.update(base_origins)
    _deep_merge(merged, data)
    for key in _dotted_keys(data):
        origins[key] = str(path)
    return merged, origins


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = _deep_copy(value)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for index, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: index + 1])
            raise ConfigError(f"override {key}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value
