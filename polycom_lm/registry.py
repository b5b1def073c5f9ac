"""The one registry idiom used for everything pluggable (activations, model families, data sources,
parallel backends): a decorator registers a class under a name, and looking up an unknown name raises an
error that lists the registered ones."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from polycom_lm.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """A `dict` from name to registered object, with a `register` decorator and helpful lookups.

    >>> MODELS = Registry("model family")
    >>> @MODELS.register("dense")
    ... class Dense: ...
    >>> MODELS.get("dense") is Dense
    True
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name]!r} and {obj!r})")
            self[name] = obj
            return obj

        return decorate

    def get(self, name: str):  # type: ignore[override]
        if name not in self:
            raise ConfigError(self.unknown_message(name))
        return self[name]

    def unknown_message(self, name: object) -> str:
        names = sorted(self)
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; registered: {', '.join(names)}"
