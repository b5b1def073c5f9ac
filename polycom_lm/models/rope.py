"""Rotary position embedding (Su et al., 2021) in the "rotate half" layout of transformers' Llama.

The head dimension is split into two halves [x1 | x2]; frequency i rotates the pair (x1[i], x2[i]). This
is the layout of Hugging Face Llama checkpoints, so weights convert without permuting q/k rows.
"""

from __future__ import annotations

import torch
from torch import nn

from polycom_lm.errors import ConfigError


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim] float32, for positions 0..max_seq_len-1."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inverse_frequency = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    )
    positions = torch.arange(max_seq_len, device=device, dtype=torch.int64).float()
    angles = torch.outer(positions, inverse_frequency)  # [max_seq_len, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, seq, heads, head_dim] by position; `cos`, `sin` are [seq, head_dim] float32 (the
    same positions for every row) or [batch, seq, head_dim] (per-row positions, e.g. after a KV cache).

    The rotation runs in at least float32 (bf16 angles at position 4000 are off by whole radians) and the
    result is cast back to x's dtype.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    else:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    wide = x.to(compute_dtype)
    return (wide * cos + rotate_half(wide) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables as non-persistent float32 buffers [max_seq_len, head_dim].

    The tables are not in the state dict (they are a function of the config). They are recomputed by
    `reset_parameters()` (called from the model's `init_weights`, e.g. after `to_empty`) and after every
    `Module._apply` (`.to(device)`, `.to(dtype)`, `.cuda()`), so a model cast to bf16 keeps float32 angles.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        device = torch.get_default_device()
        cos, sin = rope_tables(head_dim, max_seq_len, theta, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self) -> None:
        device = self.cos.device
        if device.type == "meta":
            return
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device)
        self.cos = cos
        self.sin = sin

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        result = super()._apply(fn, recurse)
        # A dtype cast or `to_empty` leaves wrong or uninitialised tables: rebuild them in float32.
        self.reset_parameters()
        return result

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..seq_len-1, each [seq_len, head_dim] float32."""
        if seq_len > self.max_seq_len:
            raise ConfigError(
                f"sequence length {seq_len} exceeds model.max_seq_len {self.max_seq_len}; "
                "raise model.max_seq_len or shorten training.seq_len"
            )
        return self.cos[:seq_len], self.sin[:seq_len]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at `positions` [batch, seq] int64: each [batch, seq, head_dim] float32."""
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ConfigError(
                f"position {int(positions.max())} is beyond model.max_seq_len {self.max_seq_len}; "
                "shorten the input (prompt plus generated tokens)"
            )
        return self.cos[positions], self.sin[positions]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}"
