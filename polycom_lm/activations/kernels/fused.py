"""Memory-efficient custom autograd Functions for PolyNorm and the (ReLU) polynomials.

Each Function keeps only the input x (and, for PolyNorm / PolyReLUNorm, the r per-row inverse norms, fp32
for half inputs) for backward and computes the closed-form gradients of `closed_form`. The per-row work runs on
one of the interchangeable `select.FUSED_BACKENDS` with the same functions: `eager` (`closed_form`),
`inductor` (the same ops under `torch.compile`, `compiled.py`) or `triton` (`triton_polycom.py`).

Tensor parallelism (PolyNorm): when `row_sum_reducer` is given, x holds a column shard of rows that are
`full_width` wide. The local row sums (forward) and the local row dots (backward) are passed through the
reducer (an all-reduce SUM over the shards) so the norms span the full width. The coefficient and bias
gradients are the shard's share: summed over the shards they equal the full-width gradients.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from polycom_lm.activations.kernels import closed_form
from polycom_lm.activations.kernels.reference import RowSumReducer
from polycom_lm.activations.kernels.select import FUSED_BACKENDS


def get_backend(name: str) -> ModuleType:
    """The module implementing the closed-form functions for backend `name`."""
    if name == "eager":
        return closed_form
    if name == "inductor":
        from polycom_lm.activations.kernels import compiled

        return compiled.compiled_closed_form()
    if name == "triton":
        from polycom_lm.activations.kernels import triton_polycom

        return triton_polycom
    raise ValueError(f"unknown PolyCom kernel backend {name!r}; expected one of {', '.join(FUSED_BACKENDS)}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., w] → contiguous [rows, w]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


class PolyNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        eps: float,
        backend_name: str,
        row_sum_reducer: Optional[RowSumReducer],
        full_width: Optional[int],
        relu: bool = False,
    ) -> torch.Tensor:
        backend = get_backend(backend_name)
        rows = _rows(x)
        order = weight.shape[0]
        if row_sum_reducer is None:
            out, inverse_norms = backend.polynorm_forward(rows, weight, bias, eps, relu)
            width = rows.shape[-1]
        else:
            width = full_width if full_width is not None else rows.shape[-1]
            sums = row_sum_reducer(backend.polynorm_row_sums(rows, order, relu))
            inverse_norms = closed_form.polynorm_inverse_norms(sums, width, eps)
            out = backend.polynorm_forward_from_inverse_norms(rows, inverse_norms, weight, bias, relu)
        ctx.save_for_backward(x, weight, inverse_norms)
        ctx.relu = relu
        ctx.backend_name = backend_name
        ctx.row_sum_reducer = row_sum_reducer
        ctx.width = width
        ctx.bias_dtype = bias.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, inverse_norms = ctx.saved_tensors
        backend = get_backend(ctx.backend_name)
        rows = _rows(x)
        grad = _rows(grad_out)
        if ctx.row_sum_reducer is None:
            input_grad, weight_grad, bias_grad = backend.polynorm_backward(rows, grad, inverse_norms, weight, ctx.relu)
        else:
            local_dots = backend.polynorm_row_dots(rows, grad, weight.shape[0], ctx.relu)
            dots = ctx.row_sum_reducer(local_dots.clone())
            input_grad = backend.polynorm_input_grad(rows, grad, inverse_norms, dots, weight, ctx.width, ctx.relu)
            weight_grad, bias_grad = closed_form.polynorm_coefficient_grads(grad, inverse_norms, local_dots)
        return (
            input_grad.view(x.shape),
            weight_grad.to(weight.dtype),
            bias_grad.to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
            None,
        )


class PolynomialFunction(torch.autograd.Function):
    """Σ_k c_k z^k + b with z = relu(x) (PolyReLU) or z = x (Poly); keeps only x for backward."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool, backend_name: str
    ) -> torch.Tensor:
        backend = get_backend(backend_name)
        out = backend.polynomial_forward(_rows(x), weight, bias, relu)
        ctx.save_for_backward(x, weight)
        ctx.relu = relu
        ctx.backend_name = backend_name
        ctx.bias_dtype = bias.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        backend = get_backend(ctx.backend_name)
        input_grad, weight_grad, bias_grad = backend.polynomial_backward(
            _rows(x), _rows(grad_out), weight, ctx.relu
        )
        return (
            input_grad.view(x.shape),
            weight_grad.to(weight.dtype),
            bias_grad.to(ctx.bias_dtype),
            None,
            None,
        )


class PReLUPolynomialFunction(torch.autograd.Function):
    """Σ_k c_k z^k + b with z = prelu(x) and a learnable negative slope; keeps only x for backward."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor, backend_name: str
    ) -> torch.Tensor:
        backend = get_backend(backend_name)
        out = backend.prelu_polynomial_forward(_rows(x), weight, bias, slope)
        ctx.save_for_backward(x, weight, slope)
        ctx.backend_name = backend_name
        ctx.bias_dtype = bias.dtype
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, slope = ctx.saved_tensors
        backend = get_backend(ctx.backend_name)
        input_grad, weight_grad, bias_grad, slope_grad = backend.prelu_polynomial_backward(
            _rows(x), _rows(grad_out), weight, slope
        )
        return (
            input_grad.view(x.shape),
            weight_grad.to(weight.dtype),
            bias_grad.to(ctx.bias_dtype),
            slope_grad.to(slope.dtype),
            None,
        )


def polynorm_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    backend: str = "eager",
    row_sum_reducer: Optional[RowSumReducer] = None,
    full_width: Optional[int] = None,
    relu: bool = False,
) -> torch.Tensor:
    """PolyNorm (PolyReLUNorm: `relu=True`, the norms of relu(x)'s powers) with the memory-efficient
    closed-form backward; [..., w] → [..., w]."""
    return PolyNormFunction.apply(x, weight, bias, eps, backend, row_sum_reducer, full_width, relu)


def polynomial_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool, backend: str = "eager"
) -> torch.Tensor:
    """PolyReLU (`relu=True`) or Poly with the memory-efficient closed-form backward."""
    return PolynomialFunction.apply(x, weight, bias, relu, backend)


def prelu_polynomial_fused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor, backend: str = "eager"
) -> torch.Tensor:
    """PolyPReLU with the memory-efficient closed-form backward; [..., w] → [..., w]."""
    return PReLUPolynomialFunction.apply(x, weight, bias, slope, backend)
