"""The model's projection layer: `nn.Linear` whose fp32 CPU matmuls can run through oneDNN.

PyTorch sends an fp32 CPU `F.linear` to MKL's sgemm; bf16 already goes to oneDNN. Measured on the 2-core
AMD EPYC (AVX-512) that this project is developed on, oneDNN's fp32 matmul is 10–30% faster than MKL's
in isolation for the forward product and the input gradient of the model's projections (about 8% less
matmul time over a whole training step; `scripts/bench_train.py` shows the step-level effect side by
side), and no faster for the weight gradient, whose transposed operands oneDNN takes slowly. So
`impl="auto"` uses oneDNN for `x @ Wᵀ` and `g @ W` and keeps the weight gradient `gᵀ @ x` on ATen.

Everything else takes `F.linear` unchanged: autocast (its casts and bf16 kernels), other dtypes and
devices, and parameters that are not plain tensors (tensor-parallel DTensors, DeepSpeed ZeRO-3
partitions), so the parallel engines and the Hugging Face interop see an ordinary `nn.Linear`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

from polycom_lm.errors import ConfigError

LINEAR_IMPLS = ("auto", "aten")


# Read once: torch.compile cannot trace `torch.backends.mkldnn.is_available()`.
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("polycom_lm::onednn_matmul", mutates_args=())
def _onednn_matmul_op(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, None, "none", [], "")


@_onednn_matmul_op.register_fake
def _(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


def _matmul_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a oneDNN linear: 2 · (output elements) · (input features). Written from the output shape
    so that it also holds for the `binary` overload of `mkldnn._linear_pointwise`, whose second argument
    is not the weight."""
    return 2 * math.prod(out_shape) * x_shape[-1]


_FLOP_TARGETS = [torch.ops.polycom_lm.onednn_matmul]
if ONEDNN_AVAILABLE:
    _FLOP_TARGETS.append(torch.ops.mkldnn._linear_pointwise)
register_flop_formula([t for t in _FLOP_TARGETS if t not in flop_registry])(_matmul_flops)


def _onednn_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [m, k] @ weightᵀ, weight [n, k] → [m, n] through oneDNN. Inside torch.compile it is an opaque
    custom op: Inductor's own lowering of the oneDNN linear assumes frozen (constant) weights."""
    if torch.compiler.is_compiling():
        return _onednn_matmul_op(x2d, weight)
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ Wᵀ (+ b) with x [..., k], W [n, k], b [n]; saves x and W, as `F.linear` does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _onednn_matmul(x.reshape(-1, x.shape[-1]), weight)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad_2d, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_2d.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def _plain(tensor: Optional[torch.Tensor]) -> bool:
    """A local, unpartitioned tensor: not a DTensor or other subclass, not a DeepSpeed ZeRO-3 partition."""
    return tensor is None or (type(tensor) in (torch.Tensor, nn.Parameter) and not hasattr(tensor, "ds_id"))


def use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether `linear(..., impl="auto")` takes the oneDNN path for these operands."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and _plain(x)
        and _plain(weight)
        and _plain(bias)
        and ONEDNN_AVAILABLE
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where `impl="auto"` and `use_onednn` says so."""
    if impl == "auto" and use_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state-dict keys and init) whose forward is `linear(..., impl)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, impl: str = "auto", **kwargs):
        if impl not in LINEAR_IMPLS:
            raise ConfigError(f"model.linear_impl must be one of {', '.join(LINEAR_IMPLS)}, got {impl!r}")
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"
