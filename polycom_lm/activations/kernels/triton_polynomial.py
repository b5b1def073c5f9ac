"""Triton kernels for the elementwise polynomials (PolyReLU, Poly, PolyPReLU), forward and backward: part
of the `triton` backend that `triton_polycom` exports.

Their backward writes per-program partial sums for the coefficient and bias gradients (and PolyPReLU's
slope gradient), summed afterwards. PolyPReLU (`PRELU`) loads the slope and applies it to the negative
inputs. float64 inputs go to the PyTorch closed form (the kernels compute in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_lm.activations.kernels import closed_form

ELEMENTWISE_BLOCK = 1024


@triton.jit
def _pick(vector, indices, k):
    """vector[k] for a small register vector, as a scalar."""
    return tl.sum(tl.where(indices == k, vector, 0.0), axis=0)


def _order_pad(order: int) -> int:
    return triton.next_power_of_2(order + 2)  # two spare slots (the backward's bias and slope sums)


def _coefficients(weight: torch.Tensor) -> torch.Tensor:
    return closed_form.ascending_coefficients(weight, torch.float32).contiguous()


def _bias(bias: torch.Tensor, device: torch.device) -> torch.Tensor:
    return bias.detach().to(device=device, dtype=torch.float32).reshape(1).contiguous()


@triton.jit
def _polynomial_forward_kernel(
    x_ptr, coefficients_ptr, bias_ptr, slope_ptr, out_ptr, numel,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, RELU: tl.constexpr, PRELU: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    ranks = tl.arange(0, ORDER_PAD)
    coefficients = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0)
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0)
    if PRELU:
        z = tl.where(z > 0, z, tl.load(slope_ptr) * z)
    accumulator = tl.zeros([BLOCK], dtype=tl.float32) + _pick(coefficients, ranks, ORDER - 1)
    for step in tl.static_range(ORDER - 1):
        accumulator = _pick(coefficients, ranks, ORDER - 2 - step) + z * accumulator
    out = z * accumulator + tl.load(bias_ptr)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _polynomial_backward_kernel(
    x_ptr, grad_ptr, coefficients_ptr, slope_ptr, input_grad_ptr, partial_ptr, numel,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, RELU: tl.constexpr, PRELU: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    offsets = program * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    ranks = tl.arange(0, ORDER_PAD)
    coefficients = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = x
    if RELU:
        z = tl.maximum(x, 0.0)
    if PRELU:
        slope = tl.load(slope_ptr)
        z = tl.where(x > 0, x, slope * x)
    derivative = tl.zeros([BLOCK], dtype=tl.float32) + ORDER * _pick(coefficients, ranks, ORDER - 1)
    for step in tl.static_range(ORDER - 1):
        derivative = (ORDER - 1 - step) * _pick(coefficients, ranks, ORDER - 2 - step) + z * derivative
    input_grad = grad * derivative
    # Partial sums for the coefficient gradients: Σ g z^k (k = 1..r) in slots 0..r-1, Σ g in slot r and,
    # for PolyPReLU, the slope's Σ g p'(z) x over x <= 0 in slot r + 1.
    partials = tl.where(ranks == ORDER, tl.sum(grad, axis=0), 0.0)
    if RELU:
        input_grad = tl.where(x > 0, input_grad, 0.0)
    if PRELU:
        partials += tl.where(ranks == ORDER + 1, tl.sum(tl.where(x > 0, 0.0, input_grad * x), axis=0), 0.0)
        input_grad = tl.where(x > 0, input_grad, slope * input_grad)
    tl.store(input_grad_ptr + offsets, input_grad.to(input_grad_ptr.dtype.element_ty), mask=mask)
    product = grad
    for k in tl.static_range(ORDER):
        product = product * z
        partials += tl.where(ranks == k, tl.sum(product, axis=0), 0.0)
    tl.store(partial_ptr + program * (ORDER + 2) + ranks, partials, mask=ranks <= ORDER + 1)


# ------------------------------------------------------------------------------------------- launchers


def _launch_polynomial_forward(x, weight, bias, slope, relu, prelu):
    order = weight.shape[0]
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        grid = (triton.cdiv(numel, ELEMENTWISE_BLOCK),)
        _polynomial_forward_kernel[grid](
            x, _coefficients(weight), _bias(bias, x.device), _bias(slope, x.device), out, numel,
            ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=ELEMENTWISE_BLOCK, RELU=relu, PRELU=prelu,
        )
    return out


def _launch_polynomial_backward(x, grad, weight, slope, relu, prelu):
    """(dx, per-program partial sums [programs, r + 2] summed: Σ g z^k, Σ g, slope sum)."""
    order = weight.shape[0]
    numel = x.numel()
    programs = triton.cdiv(numel, ELEMENTWISE_BLOCK)
    input_grad = torch.empty_like(x)
    partials = torch.zeros(max(programs, 1), order + 2, device=x.device, dtype=torch.float32)
    if numel:
        _polynomial_backward_kernel[(programs,)](
            x, grad, _coefficients(weight), _bias(slope, x.device), input_grad, partials, numel,
            ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=ELEMENTWISE_BLOCK, RELU=relu, PRELU=prelu,
        )
    return input_grad, partials.sum(0)


def polynomial_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    if x.dtype == torch.float64:
        return closed_form.polynomial_forward(x, weight, bias, relu)
    return _launch_polynomial_forward(x, weight, bias, bias, relu, False)


def polynomial_backward(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, relu: bool):
    if x.dtype == torch.float64:
        return closed_form.polynomial_backward(x, grad, weight, relu)
    order = weight.shape[0]
    input_grad, totals = _launch_polynomial_backward(x, grad, weight, weight[:1], relu, False)
    return input_grad, totals[:order].flip(0), totals[order : order + 1]


def prelu_polynomial_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor):
    if x.dtype == torch.float64:
        return closed_form.prelu_polynomial_forward(x, weight, bias, slope)
    return _launch_polynomial_forward(x, weight, bias, slope, False, True)


def prelu_polynomial_backward(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, slope: torch.Tensor):
    if x.dtype == torch.float64:
        return closed_form.prelu_polynomial_backward(x, grad, weight, slope)
    order = weight.shape[0]
    input_grad, totals = _launch_polynomial_backward(x, grad, weight, slope, False, True)
    return input_grad, totals[:order].flip(0), totals[order : order + 1], totals[order + 1 : order + 2]
