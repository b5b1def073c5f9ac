"""Triton kernels for PolyNorm (and PolyReLUNorm), forward and backward; with `triton_polynomial` (the
elementwise polynomials, re-exported here) the `triton` backend of `fused.py`.

The module offers the same functions as `closed_form` (the fused autograd Functions call either), so
every kernel is tested against the same math; on CPU tests run it under `TRITON_INTERPRET=1`.

PolyNorm runs one program per row, fp32 inside. Two-pass kernels loop over the row in blocks of columns:
- forward: pass 1 accumulates the r row sums Σ x^(2k), computes and stores the inverse norms; pass 2
  writes out = Σ_k c_k inv_k x^k + b (Horner). The tensor-parallel variant skips pass 1: the row sums
  come from `polynorm_row_sums` (pass 1 alone) and are all-reduced between the two launches.
- backward: pass 1 accumulates the row dots Σ g x^k and Σ g (stored: the coefficient and bias gradients
  need them), pass 2 writes dx. Under TP the dots come all-reduced from `polynorm_row_dots`.
One-pass kernels (single device, rows up to `ONE_PASS_MAX_WIDTH`) hold the whole row in registers and
read x (and the gradient) once: the least traffic possible. PolyReLUNorm (`RELU`) is PolyNorm of
relu(x): loads apply relu and backward masks dx where x <= 0.
float64 inputs go to the PyTorch closed form (the kernels compute in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_lm.activations.kernels import closed_form
from polycom_lm.activations.kernels.triton_polynomial import (  # noqa: F401  (the backend's elementwise half)
    _bias,
    _coefficients,
    _order_pad,
    _pick,
    polynomial_backward,
    polynomial_forward,
    prelu_polynomial_backward,
    prelu_polynomial_forward,
)

MAX_ROW_BLOCK = 1024
# Rows up to this width run the one-pass kernels: the whole row in registers, x (and the gradient) read
# once instead of twice. 0 keeps every width on the two-pass kernels until the GPU benchmark
# (scripts/bench_gpu.py, "ours (fused, one pass)") shows the one-pass kernels faster at the widths used.
ONE_PASS_MAX_WIDTH = 0


@triton.jit
def _power_sums(x, ranks, ORDER: tl.constexpr):
    """[ORDER_PAD] vector of Σ x^(2k) over a block of x, k = 1..ORDER in slots 0..ORDER-1, fp32."""
    sums = ranks.to(tl.float32) * 0.0
    square = x * x
    power = square
    for k in tl.static_range(ORDER):
        sums += tl.where(ranks == k, tl.sum(power, axis=0), 0.0)
        power = power * square
    return sums


@triton.jit
def _grad_dots(x, grad, ranks, ORDER: tl.constexpr):
    """[ORDER_PAD] vector of Σ g x^k over a block, k = 1..ORDER in slots 0..ORDER-1, and Σ g (the bias
    gradient's share) in slot ORDER; fp32."""
    dots = tl.where(ranks == ORDER, tl.sum(grad, axis=0), 0.0)
    product = grad * x
    for k in tl.static_range(ORDER):
        dots += tl.where(ranks == k, tl.sum(product, axis=0), 0.0)
        product = product * x
    return dots


@triton.jit
def _polynorm_values(x, gamma, ranks, bias, ORDER: tl.constexpr, BLOCK: tl.constexpr):
    """Σ_k gamma_k x^k + bias for a block of x (Horner), gamma_k = c_k · inverse norm_k."""
    accumulator = tl.zeros([BLOCK], dtype=tl.float32) + _pick(gamma, ranks, ORDER - 1)
    for step in tl.static_range(ORDER - 1):
        accumulator = _pick(gamma, ranks, ORDER - 2 - step) + x * accumulator
    return x * accumulator + bias


@triton.jit
def _polynorm_input_grad(raw, grad, alpha, beta, ranks, ORDER: tl.constexpr, BLOCK: tl.constexpr, RELU: tl.constexpr):
    """dx for a block: g Σ_k alpha_k x^(k-1) - x Σ_k beta_k x^(2k-2), with x = relu(raw) if RELU (and dx
    zero where raw <= 0)."""
    x = raw
    if RELU:
        x = tl.maximum(raw, 0.0)
    square = x * x
    alpha_sum = tl.zeros([BLOCK], dtype=tl.float32) + _pick(alpha, ranks, ORDER - 1)
    beta_sum = tl.zeros([BLOCK], dtype=tl.float32) + _pick(beta, ranks, ORDER - 1)
    for step in tl.static_range(ORDER - 1):
        alpha_sum = _pick(alpha, ranks, ORDER - 2 - step) + x * alpha_sum
        beta_sum = _pick(beta, ranks, ORDER - 2 - step) + square * beta_sum
    input_grad = grad * alpha_sum - x * beta_sum
    if RELU:
        input_grad = tl.where(raw > 0, input_grad, 0.0)
    return input_grad


@triton.jit
def _input_grad_factors(inverse_norms_ptr, coefficients_ptr, row, ranks, dots, full_width, ORDER: tl.constexpr):
    """(alpha, beta) of `_polynorm_input_grad` from one row's inverse norms and dots Σ g x^k (slots
    0..ORDER-1, zero beyond): alpha_k = k c_k inv_k, beta_k = alpha_k inv_k² dot_k / full width."""
    inverse_norms = tl.load(inverse_norms_ptr + row * ORDER + ranks, mask=ranks < ORDER, other=0.0)
    coefficients = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0)
    alpha = (ranks + 1).to(tl.float32) * coefficients * inverse_norms
    return alpha, alpha * inverse_norms * inverse_norms * dots / full_width


@triton.jit
def _load_row_block(x_ptr, row, width, offsets, RELU: tl.constexpr):
    x = tl.load(x_ptr + row * width + offsets, mask=offsets < width, other=0.0).to(tl.float32)
    if RELU:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _row_power_sums(x_ptr, row, width, ranks, columns, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr,
                    BLOCK: tl.constexpr, RELU: tl.constexpr):
    """`_power_sums` over one whole row, block by block; z = relu(x) if RELU else x."""
    sums = tl.zeros([ORDER_PAD], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        sums += _power_sums(_load_row_block(x_ptr, row, width, start + columns, RELU), ranks, ORDER)
    return sums


@triton.jit
def _row_dots(x_ptr, grad_ptr, row, width, ranks, columns, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr,
              BLOCK: tl.constexpr, RELU: tl.constexpr):
    """`_grad_dots` over one whole row, block by block."""
    dots = tl.zeros([ORDER_PAD], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        offsets = start + columns
        x = _load_row_block(x_ptr, row, width, offsets, RELU)
        grad = tl.load(grad_ptr + row * width + offsets, mask=offsets < width, other=0.0).to(tl.float32)
        dots += _grad_dots(x, grad, ranks, ORDER)
    return dots


@triton.jit
def _polynorm_row_sums_kernel(x_ptr, sums_ptr, width, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr,
                              RELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    sums = _row_power_sums(x_ptr, row, width, ranks, columns, ORDER, ORDER_PAD, BLOCK, RELU)
    tl.store(sums_ptr + row * ORDER + ranks, sums, mask=ranks < ORDER)


@triton.jit
def _polynorm_forward_kernel(
    x_ptr, coefficients_ptr, bias_ptr, inverse_norms_ptr, out_ptr, width, full_width, eps,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_INVERSE_NORMS: tl.constexpr,
    RELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    if HAS_INVERSE_NORMS:
        inverse_norms = tl.load(inverse_norms_ptr + row * ORDER + ranks, mask=ranks < ORDER, other=0.0)
    else:
        sums = _row_power_sums(x_ptr, row, width, ranks, columns, ORDER, ORDER_PAD, BLOCK, RELU)
        inverse_norms = tl.rsqrt(sums / full_width + eps)
        tl.store(inverse_norms_ptr + row * ORDER + ranks, inverse_norms, mask=ranks < ORDER)
    coefficients = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0)
    gamma = coefficients * inverse_norms
    bias = tl.load(bias_ptr)
    for start in range(0, width, BLOCK):
        offsets = start + columns
        out = _polynorm_values(_load_row_block(x_ptr, row, width, offsets, RELU), gamma, ranks, bias, ORDER, BLOCK)
        tl.store(out_ptr + row * width + offsets, out.to(out_ptr.dtype.element_ty), mask=offsets < width)


@triton.jit
def _polynorm_forward_one_pass_kernel(
    x_ptr, coefficients_ptr, bias_ptr, inverse_norms_ptr, out_ptr, width, eps,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    """The whole row in registers (BLOCK >= width): x is read once."""
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    x = _load_row_block(x_ptr, row, width, columns, RELU)
    inverse_norms = tl.rsqrt(_power_sums(x, ranks, ORDER) / width + eps)
    tl.store(inverse_norms_ptr + row * ORDER + ranks, inverse_norms, mask=ranks < ORDER)
    gamma = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0) * inverse_norms
    out = _polynorm_values(x, gamma, ranks, tl.load(bias_ptr), ORDER, BLOCK)
    tl.store(out_ptr + row * width + columns, out.to(out_ptr.dtype.element_ty), mask=columns < width)


@triton.jit
def _polynorm_row_dots_kernel(
    x_ptr, grad_ptr, dots_ptr, width, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr,
    RELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    dots = _row_dots(x_ptr, grad_ptr, row, width, ranks, columns, ORDER, ORDER_PAD, BLOCK, RELU)
    tl.store(dots_ptr + row * ORDER + ranks, dots, mask=ranks < ORDER)


@triton.jit
def _polynorm_backward_kernel(
    x_ptr, grad_ptr, inverse_norms_ptr, coefficients_ptr, dots_ptr, input_grad_ptr, width, full_width,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_DOTS: tl.constexpr,
    RELU: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    if HAS_DOTS:  # all-reduced [rows, ORDER] dots from polynorm_row_dots (tensor parallelism)
        dots = tl.load(dots_ptr + row * ORDER + ranks, mask=ranks < ORDER, other=0.0)
    else:  # computed here; stored [rows, ORDER + 1] with the row's gradient sum last (for the bias)
        dots = _row_dots(x_ptr, grad_ptr, row, width, ranks, columns, ORDER, ORDER_PAD, BLOCK, RELU)
        tl.store(dots_ptr + row * (ORDER + 1) + ranks, dots, mask=ranks <= ORDER)
        dots = tl.where(ranks < ORDER, dots, 0.0)
    alpha, beta = _input_grad_factors(inverse_norms_ptr, coefficients_ptr, row, ranks, dots, full_width, ORDER)
    for start in range(0, width, BLOCK):
        offsets = start + columns
        mask = offsets < width
        raw = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        input_grad = _polynorm_input_grad(raw, grad, alpha, beta, ranks, ORDER, BLOCK, RELU)
        tl.store(input_grad_ptr + row * width + offsets, input_grad.to(input_grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _polynorm_backward_one_pass_kernel(
    x_ptr, grad_ptr, inverse_norms_ptr, coefficients_ptr, dots_ptr, input_grad_ptr, width,
    ORDER: tl.constexpr, ORDER_PAD: tl.constexpr, BLOCK: tl.constexpr, RELU: tl.constexpr,
):
    """The whole row in registers (BLOCK >= width): x and the gradient are read once; the row's dots and
    gradient sum are stored [rows, ORDER + 1] as in the two-pass kernel."""
    row = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, ORDER_PAD)
    columns = tl.arange(0, BLOCK)
    mask = columns < width
    raw = tl.load(x_ptr + row * width + columns, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row * width + columns, mask=mask, other=0.0).to(tl.float32)
    x = raw
    if RELU:
        x = tl.maximum(raw, 0.0)
    dots = _grad_dots(x, grad, ranks, ORDER)
    tl.store(dots_ptr + row * (ORDER + 1) + ranks, dots, mask=ranks <= ORDER)
    dots = tl.where(ranks < ORDER, dots, 0.0)
    alpha, beta = _input_grad_factors(inverse_norms_ptr, coefficients_ptr, row, ranks, dots, width, ORDER)
    input_grad = _polynorm_input_grad(raw, grad, alpha, beta, ranks, ORDER, BLOCK, RELU)
    tl.store(input_grad_ptr + row * width + columns, input_grad.to(input_grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- launchers


def _row_block(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 1)), MAX_ROW_BLOCK)


def _one_pass(width: int) -> bool:
    return 0 < width <= ONE_PASS_MAX_WIDTH


def _one_pass_launch(width: int) -> dict:
    """BLOCK covering the row; 4 warps per 2,048 columns (16 elements per thread), 4 to 16 warps."""
    block = triton.next_power_of_2(width)
    return {"BLOCK": block, "num_warps": min(16, max(4, block // 512))}


def polynorm_row_sums(x: torch.Tensor, order: int, relu: bool = False) -> torch.Tensor:
    if x.dtype == torch.float64:
        return closed_form.polynorm_row_sums(x, order, relu)
    rows, width = x.shape
    sums = torch.empty(rows, order, device=x.device, dtype=torch.float32)
    if rows:
        _polynorm_row_sums_kernel[(rows,)](
            x, sums, width, ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=_row_block(width), RELU=relu
        )
    return sums


def _launch_polynorm_forward(x, weight, bias, inverse_norms, full_width, eps, has_inverse_norms, relu):
    """One launch: the one-pass kernel for a whole single-device row up to ONE_PASS_MAX_WIDTH, else the
    two-pass one (which also takes given, all-reduced inverse norms)."""
    rows, width = x.shape
    order = weight.shape[0]
    out = torch.empty_like(x)
    if rows and not has_inverse_norms and full_width == width and _one_pass(width):
        _polynorm_forward_one_pass_kernel[(rows,)](
            x, _coefficients(weight), _bias(bias, x.device), inverse_norms, out, width, eps,
            ORDER=order, ORDER_PAD=_order_pad(order), RELU=relu, **_one_pass_launch(width),
        )
    elif rows:
        _polynorm_forward_kernel[(rows,)](
            x, _coefficients(weight), _bias(bias, x.device), inverse_norms, out, width, full_width, eps,
            ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=_row_block(width), HAS_INVERSE_NORMS=has_inverse_norms,
            RELU=relu,
        )
    return out


def polynorm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, relu: bool = False):
    """x [rows, w] contiguous → (out [rows, w], inverse norms [rows, r] fp32), one launch."""
    if x.dtype == torch.float64:
        return closed_form.polynorm_forward(x, weight, bias, eps, relu)
    inverse_norms = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=torch.float32)
    out = _launch_polynorm_forward(x, weight, bias, inverse_norms, x.shape[1], float(eps), False, relu)
    return out, inverse_norms


def polynorm_forward_from_inverse_norms(x, inverse_norms, weight, bias, relu=False):
    """The forward's second pass alone, from (all-reduced) inverse norms [rows, r]."""
    if x.dtype == torch.float64:
        return closed_form.polynorm_forward_from_inverse_norms(x, inverse_norms, weight, bias, relu)
    return _launch_polynorm_forward(x, weight, bias, inverse_norms.float().contiguous(), x.shape[1], 0.0, True, relu)


def polynorm_row_dots(x: torch.Tensor, grad: torch.Tensor, order: int, relu: bool = False) -> torch.Tensor:
    if x.dtype == torch.float64:
        return closed_form.polynorm_row_dots(x, grad, order, relu)
    rows, width = x.shape
    dots = torch.empty(rows, order, device=x.device, dtype=torch.float32)
    if rows:  # the kernel stores slots 0..order-1 of _row_dots (not the gradient sum)
        _polynorm_row_dots_kernel[(rows,)](
            x, grad, dots, width, ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=_row_block(width), RELU=relu
        )
    return dots


def _launch_polynorm_backward(x, grad, inverse_norms, dots, weight, full_width, has_dots, relu):
    """One launch: the one-pass kernel for a whole single-device row up to ONE_PASS_MAX_WIDTH, else the
    two-pass one (which also takes given, all-reduced dots)."""
    rows, width = x.shape
    order = weight.shape[0]
    input_grad = torch.empty_like(x)
    if rows and not has_dots and full_width == width and _one_pass(width):
        _polynorm_backward_one_pass_kernel[(rows,)](
            x, grad, inverse_norms.contiguous(), _coefficients(weight), dots, input_grad, width,
            ORDER=order, ORDER_PAD=_order_pad(order), RELU=relu, **_one_pass_launch(width),
        )
    elif rows:
        _polynorm_backward_kernel[(rows,)](
            x, grad, inverse_norms.contiguous(), _coefficients(weight), dots, input_grad, width, full_width,
            ORDER=order, ORDER_PAD=_order_pad(order), BLOCK=_row_block(width), HAS_DOTS=has_dots, RELU=relu,
        )
    return input_grad


def polynorm_input_grad(x, grad, inverse_norms, dots, weight, width, relu=False):
    """dx from (all-reduced) row dots; `width` is the full row width."""
    if x.dtype == torch.float64:
        return closed_form.polynorm_input_grad(x, grad, inverse_norms, dots, weight, width, relu)
    return _launch_polynorm_backward(x, grad, inverse_norms, dots.float().contiguous(), weight, width, True, relu)


def polynorm_backward(x, grad, inverse_norms, weight, relu=False):
    """Single-device backward: (dx [rows, w], d weight [r], d bias [1]) in one launch that reads x and the
    gradient; the coefficient and bias gradients come from the per-row dots and gradient sums it stores
    ([rows, r + 1]), so the gradient is not read again."""
    if x.dtype == torch.float64:
        return closed_form.polynorm_backward(x, grad, inverse_norms, weight, relu)
    order = weight.shape[0]
    dots = torch.empty(x.shape[0], order + 1, device=x.device, dtype=torch.float32)
    input_grad = _launch_polynorm_backward(x, grad, inverse_norms, dots, weight, x.shape[1], False, relu)
    weight_grad = (inverse_norms * dots[:, :order]).sum(0).flip(0)
    return input_grad, weight_grad, dots[:, order].sum().reshape(1)
