"""Activation functions, selected by name from the `ACTIVATIONS` registry.

Every activation class declares `gated` (consumes [..., 2w] laid out as `[gate | up]`, returns [..., w]),
`normalizes_over_width` (needs row statistics over the full FFN width under tensor parallelism) and
`has_coefficients` (learnable `weight` / `bias`, and any further parameters of its own such as
PolyPReLU's `negative_slope`, which the trainer logs and gives their own weight decay).
"""

from polycom_lm.activations.registry import ACTIVATIONS, Activation, build_activation, build_activation_from_config

# Importing the families registers their classes.
from polycom_lm.activations import elementwise, gated, polycom  # noqa: E402,F401  isort: skip
from polycom_lm.activations.elementwise import GELU, ReLU, SquaredReLU  # noqa: E402
from polycom_lm.activations.gated import GEGLU, SwiGLU  # noqa: E402
from polycom_lm.activations.polycom import Poly, PolyNorm, PolyPReLU, PolyReLU, PolyReLUNorm  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "build_activation",
    "build_activation_from_config",
    "ReLU",
    "GELU",
    "SquaredReLU",
    "SwiGLU",
    "GEGLU",
    "PolyReLU",
    "PolyNorm",
    "Poly",
    "PolyPReLU",
    "PolyReLUNorm",
]
