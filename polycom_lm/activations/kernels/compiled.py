"""The `compiled` implementation: the closed-form forward/backward bodies under `torch.compile`,
registered as `torch.library` custom ops so that compiling a whole model treats each activation as one
opaque op (no graph break, and Inductor does not re-derive a worse backward from the formula).

`eps` is a closure constant of the compiled body, one compiled function per value: passed as a Python
float argument, Dynamo would turn it into a float64 graph input and Inductor would compute the
normalisation in float64, several times slower.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Callable

import torch

from polycom_lm.activations.kernels import closed_form
from polycom_lm.activations.kernels.reference import compute_dtype


def _compile(function: Callable) -> Callable:
    return torch.compile(function, fullgraph=True, dynamic=None)


@functools.lru_cache(maxsize=None)
def _polynorm_forward_for_eps(eps: float, relu: bool) -> Callable:
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        return closed_form.polynorm_forward(x, weight, bias, eps, relu)

    return _compile(forward)


@functools.lru_cache(maxsize=None)
def compiled_closed_form() -> SimpleNamespace:
    """The `closed_form` functions used by the fused autograd Functions, each compiled."""

    def polynorm_forward(x, weight, bias, eps, relu=False):
        return _polynorm_forward_for_eps(float(eps), bool(relu))(x, weight, bias)

    return SimpleNamespace(
        polynorm_forward=polynorm_forward,
        polynorm_row_sums=_compile(closed_form.polynorm_row_sums),
        polynorm_forward_from_inverse_norms=_compile(closed_form.polynorm_forward_from_inverse_norms),
        polynorm_row_dots=_compile(closed_form.polynorm_row_dots),
        polynorm_input_grad=_compile(closed_form.polynorm_input_grad),
        polynorm_backward=_compile(closed_form.polynorm_backward),
        polynomial_forward=_compile(closed_form.polynomial_forward),
        polynomial_backward=_compile(closed_form.polynomial_backward),
        prelu_polynomial_forward=_compile(closed_form.prelu_polynomial_forward),
        prelu_polynomial_backward=_compile(closed_form.prelu_polynomial_backward),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


# ------------------------------------------------------------------------------------------ PolyNorm ops


@torch.library.custom_op("polycom_lm::polynorm_forward", mutates_args=())
def polynorm_forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, relu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., w] → (out [..., w], inverse norms [rows, r] in the compute dtype); PolyReLUNorm if `relu`."""
    out, inverse_norms = compiled_closed_form().polynorm_forward(_rows(x), weight, bias, eps, relu)
    return out.view(x.shape), inverse_norms


@polynorm_forward_op.register_fake
def _(x, weight, bias, eps, relu):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x), x.new_empty((rows, weight.shape[0]), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("polycom_lm::polynorm_backward", mutates_args=())
def polynorm_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, inverse_norms: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (dx [..., w], d weight [r], d bias [1]); the coefficient grads in the compute dtype."""
    input_grad, weight_grad, bias_grad = compiled_closed_form().polynorm_backward(
        _rows(x), _rows(grad), inverse_norms, weight, relu
    )
    return input_grad.view(x.shape), weight_grad, bias_grad


@polynorm_backward_op.register_fake
def _(grad, x, weight, inverse_norms, relu):
    dtype = compute_dtype(x.dtype)
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=dtype), weight.new_empty((1,), dtype=dtype)


def _polynorm_setup_context(ctx, inputs, output):
    x, weight, bias, _, relu = inputs
    _, inverse_norms = output
    ctx.save_for_backward(x, weight, inverse_norms)
    ctx.bias_dtype = bias.dtype
    ctx.relu = relu
    ctx.mark_non_differentiable(inverse_norms)


def _polynorm_backward(ctx, grad_out, _grad_inverse_norms):
    x, weight, inverse_norms = ctx.saved_tensors
    input_grad, weight_grad, bias_grad = polynorm_backward_op(grad_out, x, weight, inverse_norms, ctx.relu)
    return input_grad, weight_grad.to(weight.dtype), bias_grad.to(ctx.bias_dtype), None, None


polynorm_forward_op.register_autograd(_polynorm_backward, setup_context=_polynorm_setup_context)


def polynorm_compiled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, relu: bool = False
) -> torch.Tensor:
    """Single-device PolyNorm (PolyReLUNorm if `relu`) through the compiled custom ops; [..., w] → [..., w]."""
    return polynorm_forward_op(x, weight, bias, eps, relu)[0]


# ---------------------------------------------------------------------------------------- polynomial ops


@torch.library.custom_op("polycom_lm::polynomial_forward", mutates_args=())
def polynomial_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """Σ_k c_k z^k + b, z = relu(x) if `relu` else x; [..., w] → [..., w]."""
    return compiled_closed_form().polynomial_forward(_rows(x), weight, bias, relu).view(x.shape)


@polynomial_forward_op.register_fake
def _(x, weight, bias, relu):
    return torch.empty_like(x)


@torch.library.custom_op("polycom_lm::polynomial_backward", mutates_args=())
def polynomial_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_grad, weight_grad, bias_grad = compiled_closed_form().polynomial_backward(
        _rows(x), _rows(grad), weight, relu
    )
    return input_grad.view(x.shape), weight_grad, bias_grad


@polynomial_backward_op.register_fake
def _(grad, x, weight, relu):
    dtype = compute_dtype(x.dtype)
    return torch.empty_like(x), weight.new_empty(weight.shape, dtype=dtype), weight.new_empty((1,), dtype=dtype)


def _polynomial_setup_context(ctx, inputs, output):
    x, weight, bias, relu = inputs
    ctx.save_for_backward(x, weight)
    ctx.relu = relu
    ctx.bias_dtype = bias.dtype


def _polynomial_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    input_grad, weight_grad, bias_grad = polynomial_backward_op(grad_out, x, weight, ctx.relu)
    return input_grad, weight_grad.to(weight.dtype), bias_grad.to(ctx.bias_dtype), None


polynomial_forward_op.register_autograd(_polynomial_backward, setup_context=_polynomial_setup_context)


def polynomial_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """PolyReLU (`relu=True`) or Poly through the compiled custom ops."""
    return polynomial_forward_op(x, weight, bias, relu)


# ------------------------------------------------------------------------------- PReLU polynomial ops


@torch.library.custom_op("polycom_lm::prelu_polynomial_forward", mutates_args=())
def prelu_polynomial_forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor
) -> torch.Tensor:
    """PolyPReLU: Σ_k c_k z^k + b, z = prelu(x) with negative slope `slope` [1]; [..., w] → [..., w]."""
    return compiled_closed_form().prelu_polynomial_forward(_rows(x), weight, bias, slope).view(x.shape)


@prelu_polynomial_forward_op.register_fake
def _(x, weight, bias, slope):
    return torch.empty_like(x)


@torch.library.custom_op("polycom_lm::prelu_polynomial_backward", mutates_args=())
def prelu_polynomial_backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, slope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    input_grad, weight_grad, bias_grad, slope_grad = compiled_closed_form().prelu_polynomial_backward(
        _rows(x), _rows(grad), weight, slope
    )
    return input_grad.view(x.shape), weight_grad, bias_grad, slope_grad


@prelu_polynomial_backward_op.register_fake
def _(grad, x, weight, slope):
    dtype = compute_dtype(x.dtype)
    return (torch.empty_like(x), weight.new_empty(weight.shape, dtype=dtype), weight.new_empty((1,), dtype=dtype),
            weight.new_empty((1,), dtype=dtype))


def _prelu_polynomial_setup_context(ctx, inputs, output):
    x, weight, bias, slope = inputs
    ctx.save_for_backward(x, weight, slope)
    ctx.bias_dtype = bias.dtype


def _prelu_polynomial_backward(ctx, grad_out):
    x, weight, slope = ctx.saved_tensors
    input_grad, weight_grad, bias_grad, slope_grad = prelu_polynomial_backward_op(grad_out, x, weight, slope)
    return input_grad, weight_grad.to(weight.dtype), bias_grad.to(ctx.bias_dtype), slope_grad.to(slope.dtype)


prelu_polynomial_forward_op.register_autograd(_prelu_polynomial_backward, setup_context=_prelu_polynomial_setup_context)


def prelu_polynomial_compiled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor
) -> torch.Tensor:
    """PolyPReLU through the compiled custom ops."""
    return prelu_polynomial_forward_op(x, weight, bias, slope)
