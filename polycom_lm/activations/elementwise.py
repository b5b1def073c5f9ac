"""Elementwise, non-gated activations: ReLU, GELU and squared ReLU (Primer's ReLU²)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polycom_lm.activations.registry import ACTIVATIONS, Activation


@ACTIVATIONS.register("relu")
class ReLU(Activation):
    """relu(x); [..., w] → [..., w]."""


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


@ACTIVATIONS.register("gelu")
class GELU(Activation):
    """gelu(x) (exact erf form by default; `approximate="tanh"` for the tanh form); [..., w] → [..., w]."""


    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


@ACTIVATIONS.register("squared_relu")
class SquaredReLU(Activation):
    """relu(x)²; [..., w] → [..., w]."""


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(F.relu(x))
