"""Root-mean-square layer norm (Zhang & Sennrich, 2019), as used by Llama."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², last dim) + eps) · weight.

    Shapes: [..., dim] → [..., dim]. The statistics are taken in at least float32 whatever the input dtype (a bf16
    mean of squares loses most of its mantissa); the result is cast back before the gain, exactly as
    transformers' `LlamaRMSNorm` does, so converted checkpoints match to rounding.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        wide = x.to(torch.promote_types(input_dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * wide.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
