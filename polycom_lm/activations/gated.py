"""Gated activations (GLU variants). The input is twice as wide as the output and laid out as
`[gate | up]` halves along the last dim, as in transformers' Llama `act(gate_proj(x)) * up_proj(x)` with
`gate_proj` and `up_proj` concatenated into one projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polycom_lm.activations.registry import ACTIVATIONS, Activation


def split_gate_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2w] → ([..., w] gate, [..., w] up)."""
    if x.shape[-1] % 2:
        raise ValueError(f"a gated activation needs an even last dim ([gate | up]), got shape {tuple(x.shape)}")
    return x.chunk(2, dim=-1)


@ACTIVATIONS.register("swiglu")
class SwiGLU(Activation):
    """silu(gate) · up; [..., 2w] → [..., w]."""

    gated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = split_gate_up(x)
        return F.silu(gate) * up


@ACTIVATIONS.register("geglu")
class GEGLU(Activation):
    """gelu(gate) · up; [..., 2w] → [..., w]."""

    gated = True

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"geglu approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = split_gate_up(x)
        return F.gelu(gate, approximate=self.approximate) * up
