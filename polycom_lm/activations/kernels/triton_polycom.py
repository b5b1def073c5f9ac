"""Triton kernels for PolyNorm and the (ReLU) polynomials, forward and backward.

The module offers the same functions as `closed_form` (the fused autograd Functions call either), so
every kernel is tested against the same math; on CPU tests run it under `TRITON_INTERPRET=1`.

PolyNorm runs one program per row, looping over the row in blocks of columns, fp32 inside:
- forward: pass 1 accumulates the r row sums Σ x^(2k), computes and stores the inverse norms; pass 2
  writes out = Σ_k c_k inv_k x^k + b (Horner). The tensor-parallel variant skips pass 1: the row sums
  come from `polynorm_row_sums` (pass 1 alone) and are all-reduced between the two launches.
- backward: pass 1 accumulates the row dots Σ g x^k (stored: the coefficient gradients need them),
  pass 2 writes dx. Under TP the dots come all-reduced from `polynorm_row_dots` and pass 1 is skipped.
The polynomials are elementwise; their backward writes per-program partial sums for the coefficient and
bias gradients (and PolyPReLU's slope gradient), summed afterwards. PolyReLUNorm (`RELU`) is PolyNorm of
relu(x): the row loops apply relu on load and backward masks dx where x <= 0; PolyPReLU (`PRELU`) loads the
slope and applies it to the negative inputs.
float64 inputs go to the PyTorch closed form (the kernels compute in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom_lm.activations.kernels import closed_form

MAX_ROW_BLOCK = 1024
ELEMENTWISE_BLOCK = 1024


@triton.jit
def _pick(vector, indices, k):
    """vector[k] for a small register vector, as a scalar."""
    return tl.sum(tl.where(indices == k, vector, 0.0), axis=0)


@triton.jit
def _row_power_sums(x_ptr, row, width, ranks, columns, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr,
                    BLOCK: tl.constexpr, RELU: tl.constexpr):
    """[ORDER_PAD] vector of Σ_j z_j^(2k) over one row, k = 1..ORDER (zero padding), fp32; z = relu(x) if
    RELU else x."""
    sums = tl.zeros([ORDER_PAD], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        offsets = start + columns
        x = tl.load(x_ptr + row * width + offsets, mask=offsets < width, other=0.0).to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
        square = x * x
        power = square
        for k in tl.static_range(ORDER):
            sums += tl.where(ranks == k, tl.sum(power, axis=0), 0.0)
            power = power * square
    return sums


@triton.jit
def _row_dots(x_ptr, grad_ptr, row, width, ranks, columns, ORDER: tl.constexpr, ORDER_PAD: tl.constexpr,
              BLOCK: tl.constexpr, RELU: tl.constexpr):
    """[ORDER_PAD] vector of Σ_j g_j z_j^k over one row, k = 1..ORDER, in slots 0..ORDER-1, and Σ_j g_j
    (the row's share of the bias gradient) in slot ORDER; fp32."""
    dots = tl.zeros([ORDER_PAD], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        offsets = start + columns
        mask = offsets < width
        x = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
        grad = tl.load(grad_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        dots += tl.where(ranks == ORDER, tl.sum(grad, axis=0), 0.0)
        product = grad * x
        for k in tl.static_range(ORDER):
            dots += tl.where(ranks == k, tl.sum(product, axis=0), 0.0)
            product = product * x
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
        mask = offsets < width
        x = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
        accumulator = tl.zeros([BLOCK], dtype=tl.float32) + _pick(gamma, ranks, ORDER - 1)
        for step in tl.static_range(ORDER - 1):
            accumulator = _pick(gamma, ranks, ORDER - 2 - step) + x * accumulator
        out = x * accumulator + bias
        tl.store(out_ptr + row * width + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    inverse_norms = tl.load(inverse_norms_ptr + row * ORDER + ranks, mask=ranks < ORDER, other=0.0)
    coefficients = tl.load(coefficients_ptr + ranks, mask=ranks < ORDER, other=0.0)
    alpha = (ranks + 1).to(tl.float32) * coefficients * inverse_norms
    beta = alpha * inverse_norms * inverse_norms * dots / full_width
    for start in range(0, width, BLOCK):
        offsets = start + columns
        mask = offsets < width
        raw = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        x = raw
        if RELU:
            x = tl.maximum(raw, 0.0)
        grad = tl.load(grad_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        square = x * x
        alpha_sum = tl.zeros([BLOCK], dtype=tl.float32) + _pick(alpha, ranks, ORDER - 1)
        beta_sum = tl.zeros([BLOCK], dtype=tl.float32) + _pick(beta, ranks, ORDER - 1)
        for step in tl.static_range(ORDER - 1):
            alpha_sum = _pick(alpha, ranks, ORDER - 2 - step) + x * alpha_sum
            beta_sum = _pick(beta, ranks, ORDER - 2 - step) + square * beta_sum
        input_grad = grad * alpha_sum - x * beta_sum
        if RELU:
            input_grad = tl.where(raw > 0, input_grad, 0.0)
        tl.store(input_grad_ptr + row * width + offsets, input_grad.to(input_grad_ptr.dtype.element_ty), mask=mask)


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


def _row_block(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 1)), MAX_ROW_BLOCK)


def _order_pad(order: int) -> int:
    return triton.next_power_of_2(order + 2)  # two spare slots (the polynomial backward's bias and slope sums)


def _coefficients(weight: torch.Tensor) -> torch.Tensor:
    return closed_form.ascending_coefficients(weight, torch.float32).contiguous()


def _bias(bias: torch.Tensor, device: torch.device) -> torch.Tensor:
    return bias.detach().to(device=device, dtype=torch.float32).reshape(1).contiguous()


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
    rows, width = x.shape
    order = weight.shape[0]
    out = torch.empty_like(x)
    if rows:
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
    rows, width = x.shape
    order = weight.shape[0]
    input_grad = torch.empty_like(x)
    if rows:
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
