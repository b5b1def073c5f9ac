"""The dense FFN block: in-proj → activation from the registry → out-proj, and its width rule."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from polycom_lm.activations import ACTIVATIONS, build_activation_from_config
from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.init import normal_init_
from polycom_lm.models.linear import Linear


def ffn_width(model_config: ModelConfig) -> int:
    """Width of the activation's output (the out-proj's input) for `model_config`.

    `model.ffn_width` if set; otherwise the paper's parameter matching: a gated activation (SwiGLU) uses
    `ffn_hidden_size` with a 2× wide in-proj (3·d·w weights), a non-gated one 3/2 of it (2·d·(3w/2) = 3·d·w).
    """
    if model_config.ffn_width is not None:
        if model_config.ffn_width < 1:
            raise ConfigError(f"model.ffn_width must be positive, got {model_config.ffn_width}")
        return model_config.ffn_width
    try:
        return ACTIVATIONS.get(model_config.activation).parameter_matched_width(model_config.ffn_hidden_size)
    except ValueError:
        raise ConfigError(
            f"model.ffn_hidden_size {model_config.ffn_hidden_size}: 3/2 of it (the width of non-gated "
            f"activation {model_config.activation!r}) is not an integer; use an even size or set model.ffn_width"
        ) from None


class FeedForward(nn.Module):
    """x [batch, seq, d_model] → out_proj(activation(in_proj(x))) [batch, seq, d_model], no biases.

    `in_proj` is [d_model → width] for element-wise activations and [d_model → 2·width] for gated ones,
    laid out as `[gate | up]` halves (a tensor-parallel plan must shard each half, not the concatenation).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = build_activation_from_config(config)
        self.width = ffn_width(config)
        in_features = self.activation.in_width(self.width)
        self.in_proj = Linear(config.d_model, in_features, bias=False, impl=config.linear_impl)
        self.out_proj = Linear(self.width, config.d_model, bias=False, impl=config.linear_impl)
        self.init_truncation = config.init_truncation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.activation(self.in_proj(x)))

    def init_weights(self, init_std: float, output_std: float, generator: Optional[torch.Generator] = None) -> None:
        normal_init_(self.in_proj.weight, init_std, self.init_truncation, generator)
        normal_init_(self.out_proj.weight, output_std, self.init_truncation, generator)
        reset_activation(self.activation)


def reset_activation(activation: nn.Module) -> None:
    """Put an activation's learnable coefficients (PolyNorm / PolyReLU w, b) back to their own init."""
    reset = getattr(activation, "reset_parameters", None)
    if callable(reset):
        reset()
