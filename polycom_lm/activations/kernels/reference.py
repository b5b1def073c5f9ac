"""Plain-autograd PolyCom formulas: the obviously-correct baselines every fast path is tested against.

Conventions shared by every implementation in this package:
- `weight` has shape [r]; `weight[0]` multiplies the highest power x^r, `weight[r-1]` multiplies x.
- `bias` has shape [1].
- PolyNorm normalises each power over the last dim: N(y) = y / sqrt(mean(y², -1) + eps).
- Half-precision inputs (bf16/fp16) are computed in fp32 (x⁶ overflows fp16) and cast back; float32 and
  float64 are computed in their own dtype.
- `row_sum_reducer` (tensor parallelism): the last dim holds a shard of a row `full_width` wide; the
  per-row sums go through the reducer (an all-reduce SUM over the shards) before dividing by `full_width`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

RowSumReducer = Callable[[torch.Tensor], torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in for inputs of `dtype`: fp32 for half precision, else itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _ReduceRowSums(torch.autograd.Function):
    """An autograd-aware all-reduce SUM: the gradient of a sum over shards is the sum of the shards'
    gradients, so backward reduces too."""

    @staticmethod
    def forward(ctx, sums: torch.Tensor, reducer: RowSumReducer) -> torch.Tensor:
        ctx.reducer = reducer
        return reducer(sums.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.reducer(grad.clone()), None


def polynomial_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ_i weight[i] · x^(r-i) + bias; [..., w] → [..., w]."""
    order = weight.shape[0]
    x32 = x.to(compute_dtype(x.dtype))
    out = bias.to(x32.dtype)
    for index in range(order):
        out = out + weight[index].to(x32.dtype) * x32 ** (order - index)
    return out.to(x.dtype)


def polyrelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ_i weight[i] · relu(x)^(r-i) + bias; [..., w] → [..., w]."""
    return polynomial_reference(F.relu(x), weight, bias)


def polyprelu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """Σ_i weight[i] · prelu(x)^(r-i) + bias, prelu(x) = x (x > 0) else slope · x; [..., w] → [..., w]."""
    x32 = x.to(compute_dtype(x.dtype))
    prelu = torch.where(x32 > 0, x32, slope.to(x32.dtype) * x32)
    return polynomial_reference(prelu, weight, bias).to(x.dtype)


def polyrelunorm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    row_sum_reducer: Optional[RowSumReducer] = None,
    full_width: Optional[int] = None,
) -> torch.Tensor:
    """Σ_i weight[i] · N(relu(x)^(r-i)) + bias: PolyNorm of relu(x); [..., w] → [..., w]."""
    return polynorm_reference(F.relu(x), weight, bias, eps, row_sum_reducer, full_width)


def polynorm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    row_sum_reducer: Optional[RowSumReducer] = None,
    full_width: Optional[int] = None,
) -> torch.Tensor:
    """Σ_i weight[i] · N(x^(r-i)) + bias; [..., w] → [..., w] (w = the local shard under TP)."""
    order = weight.shape[0]
    x32 = x.to(compute_dtype(x.dtype))
    width = full_width if full_width is not None else x.shape[-1]
    out = bias.to(x32.dtype)
    for index in range(order):
        power = x32 ** (order - index)
        sums = (power * power).sum(-1, keepdim=True)
        if row_sum_reducer is not None:
            sums = _ReduceRowSums.apply(sums, row_sum_reducer)
        normalized = power * torch.rsqrt(sums / width + eps)
        out = out + weight[index].to(x32.dtype) * normalized
    return out.to(x.dtype)


def polynorm_paper_checkpointed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The PolyCom reference repository's PolyNorm (order 3), as published: the eager formula wrapped in
    activation checkpointing to save memory, which recomputes the forward in backward. A benchmark
    baseline only."""

    def norm(y: torch.Tensor) -> torch.Tensor:
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)

    def body(x: torch.Tensor) -> torch.Tensor:
        return weight[0] * norm(x**3) + weight[1] * norm(x**2) + weight[2] * norm(x) + bias

    return checkpoint(body, x, use_reentrant=False)
