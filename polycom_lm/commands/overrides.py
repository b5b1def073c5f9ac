"""Config overrides on the command line, in the spellings users bring from other frameworks:

    polycom-lm train cfg.yaml model.activation=relu        ours (and Hydra's)
    polycom-lm train cfg.yaml --model.activation=relu      OLMo-core, litgpt
    polycom-lm train cfg.yaml --model.activation relu      torchtitan
    polycom-lm train cfg.yaml --training.compile           a boolean key alone means true (torchtitan's flags)

`split_overrides(tokens)` takes them out of a command's arguments, in the order given (later wins), and
returns them as `key=value` strings for `load_config`, which checks keys and types with the same
did-you-mean errors whatever the spelling. The rest goes to argparse. A dashed token is an override when
its key has a dot or is a top-level config key (`--experiment`), so the commands' own options (`--resume`,
`--no-progress`) never collide with it; a bare `key=value` is one when its key is dotted or top-level too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Optional

from polycom_lm.config import Config

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _top_level_keys() -> set[str]:
    return {field.name for field in dataclasses.fields(Config)}


def _is_override_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key)) and ("." in key or key in _top_level_keys())


def _field_type(key: str) -> Optional[Any]:
    """The annotation of dotted `key` in the schema, or None when it names no field."""
    cls: Any = Config
    annotation: Any = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = cls = hints[part]
    return annotation


def split_overrides(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the overrides as `key=value` in the order given)."""
    rest: list[str] = []
    overrides: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token.startswith("--") and _is_override_key(token[2:].partition("=")[0]):
            body = token[2:]
            if "=" in body:
                overrides.append(body)
                continue
            following = tokens[index] if index < len(tokens) else None
            flag_alone = following is None or following.startswith("--")
            if _field_type(body) is bool and following is not None and following.lower() not in _BOOLEAN_WORDS:
                flag_alone = True  # `--training.compile cfg.yaml`: the next token is not this flag's value
            if flag_alone:
                overrides.append(f"{body}=true")
            else:
                overrides.append(f"{body}={following}")
                index += 1
            continue
        if not token.startswith("-") and "=" in token and _is_override_key(token.partition("=")[0]):
            overrides.append(token)
            continue
        rest.append(token)
    return rest, overrides
