"""The activation registry and its builders.

Registering an activation is one decorator on one class::

    @ACTIVATIONS.register("my_act")
    class MyActivation(Activation):
        def forward(self, x): ...

It then shows up in configs (`model.activation: my_act`), tests and benchmarks.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from polycom_lm.errors import ConfigError
from polycom_lm.registry import Registry

ACTIVATIONS = Registry("activation")


class Activation(nn.Module):
    """Base class of registered activations; subclasses override the class attributes that differ."""

    # Consumes a 2×-wide input [..., 2w] laid out as `[gate | up]` halves and returns [..., w].
    gated = False
    # Normalises over the last dim: under tensor parallelism it needs row statistics of the full width.
    normalizes_over_width = False
    # Carries learnable PolyCom coefficients `weight` [r] and `bias`, and possibly further parameters of its
    # own (PolyPReLU's `negative_slope`): all logged by the trainer, all in the `activation` weight-decay group.
    has_coefficients = False

    @classmethod
    def parameter_matched_width(cls, gated_width: int) -> int:
        """Output width of this activation's FFN at the parameter count of a gated FFN of width
        `gated_width` (whose in-proj is twice as wide: 3·d·w weights in all): `gated_width` for a gated
        activation, 3/2 of it otherwise (2·d·(3w/2) = 3·d·w). ValueError when 3/2 of it is not whole."""
        if cls.gated:
            return gated_width
        if (3 * gated_width) % 2:
            raise ValueError(f"3/2 of {gated_width} is not an integer")
        return 3 * gated_width // 2

    @classmethod
    def in_width(cls, width: int) -> int:
        """Width of the activation's input for an output of `width` (`[gate | up]` halves when gated)."""
        return 2 * width if cls.gated else width


def build_activation(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the activation registered as `name` with constructor arguments `kwargs`."""
    cls = ACTIVATIONS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigError(
            f"activation {name!r} does not accept {sorted(kwargs)}: {error}; it takes {accepted or 'no arguments'}"
        ) from None


def build_activation_from_config(model_config: Any) -> nn.Module:
    """Build `model_config.activation`, passing `order=model_config.activation_order` and
    `impl=model_config.activation_impl` to the classes whose constructor takes them."""
    cls = ACTIVATIONS.get(model_config.activation)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "order" in parameters:
        kwargs["order"] = model_config.activation_order
    if "impl" in parameters:
        kwargs["impl"] = model_config.activation_impl
    return cls(**kwargs)
