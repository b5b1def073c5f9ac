"""Closed-form forward and backward of PolyNorm and of the plain / ReLU polynomials, in PyTorch ops.

These functions are the math of the fused paths: the eager `fused` implementation calls them directly,
the `compiled` implementation runs them under `torch.compile`, and the Triton kernels compute the same
quantities per row. All tensors are 2-D: x, grad, out are [rows, w]; per-row statistics are [rows, r]
in the compute dtype (fp32 for half-precision inputs), column k-1 belonging to the power x^k.

PolyNorm, with c_k the coefficient of x^k (c_k = weight[r-k]) and W the (full) row width:
    s_k   = Σ_j x^(2k)                       row sums            (all-reduced under TP)
    inv_k = 1 / sqrt(s_k / W + eps)           per-row inverse norms, kept for backward
    out   = Σ_k c_k inv_k x^k + b
    d_k   = Σ_j g x^k                         row dots of the output gradient (all-reduced under TP)
    dx    = Σ_k k c_k inv_k x^(k-1) · g  −  Σ_k k c_k inv_k³ d_k / W · x^(2k-1)
    dc_k  = Σ_rows inv_k d_k (with the local, un-reduced d_k: a shard's share of the gradient)
    db    = Σ g
Only x and inv are needed in backward; x², x³ and the normalised terms are recomputed from x.
"""

from __future__ import annotations

import torch

from polycom_lm.activations.kernels.reference import compute_dtype


def ascending_coefficients(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [r] (highest power first) → [r] with entry k-1 the coefficient of x^k, in `dtype`."""
    return weight.detach().flip(0).to(dtype)


def polynorm_row_sums(x: torch.Tensor, order: int) -> torch.Tensor:
    """x [rows, w] → [rows, r]: Σ_j x^(2k) for k = 1..r, in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    square = xc * xc
    power = square
    sums = []
    for k in range(1, order + 1):
        sums.append(power.sum(-1))
        if k < order:
            power = power * square
    return torch.stack(sums, dim=-1)


def polynorm_inverse_norms(sums: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """Row sums [rows, r] over a `width`-wide row → inverse RMS norms [rows, r]."""
    return torch.rsqrt(sums / width + eps)


def polynorm_forward_from_inverse_norms(
    x: torch.Tensor, inverse_norms: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """out = Σ_k c_k inv_k x^k + b by Horner's rule; x [rows, w] → out [rows, w] in x's dtype."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    order = weight.shape[0]
    gamma = inverse_norms * ascending_coefficients(weight, dtype)  # [rows, r]
    accumulator = gamma[:, order - 1 : order]
    for k in range(order - 1, 0, -1):
        accumulator = gamma[:, k - 1 : k] + xc * accumulator
    out = xc * accumulator + bias.detach().to(dtype)
    return out.to(x.dtype)


def polynorm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-device PolyNorm: x [rows, w] → (out [rows, w], inverse norms [rows, r])."""
    sums = polynorm_row_sums(x, weight.shape[0])
    inverse_norms = polynorm_inverse_norms(sums, x.shape[-1], eps)
    return polynorm_forward_from_inverse_norms(x, inverse_norms, weight, bias), inverse_norms


def polynorm_row_dots(x: torch.Tensor, grad: torch.Tensor, order: int) -> torch.Tensor:
    """(x, grad) [rows, w] → [rows, r]: Σ_j grad · x^k for k = 1..r, in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    gc = grad.to(dtype)
    product = gc * xc
    dots = []
    for k in range(1, order + 1):
        dots.append(product.sum(-1))
        if k < order:
            product = product * xc
    return torch.stack(dots, dim=-1)


def polynorm_input_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    inverse_norms: torch.Tensor,
    dots: torch.Tensor,
    weight: torch.Tensor,
    width: int,
) -> torch.Tensor:
    """dx [rows, w] in x's dtype, from the (reduced) row dots; see the module docstring."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    gc = grad.to(dtype)
    order = weight.shape[0]
    powers = torch.arange(1, order + 1, device=x.device, dtype=dtype)
    scaled = powers * ascending_coefficients(weight, dtype) * inverse_norms  # k c_k inv_k, [rows, r]
    alpha = scaled
    beta = scaled * inverse_norms * inverse_norms * dots / width
    # Σ_k alpha_k x^(k-1) and Σ_k beta_k x^(2k-1) = x · Σ_k beta_k (x²)^(k-1), both by Horner's rule.
    square = xc * xc
    alpha_sum = alpha[:, order - 1 : order]
    beta_sum = beta[:, order - 1 : order]
    for k in range(order - 1, 0, -1):
        alpha_sum = alpha[:, k - 1 : k] + xc * alpha_sum
        beta_sum = beta[:, k - 1 : k] + square * beta_sum
    return (gc * alpha_sum - xc * beta_sum).to(x.dtype)


def polynorm_coefficient_grads(
    grad: torch.Tensor, inverse_norms: torch.Tensor, local_dots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d weight [r] highest power first, d bias [1]) in the compute dtype."""
    weight_grad = (inverse_norms * local_dots).sum(0).flip(0)
    bias_grad = grad.to(inverse_norms.dtype).sum().reshape(1)
    return weight_grad, bias_grad


def polynorm_backward(
    x: torch.Tensor, grad: torch.Tensor, inverse_norms: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-device PolyNorm backward: (dx [rows, w], d weight [r], d bias [1])."""
    dots = polynorm_row_dots(x, grad, weight.shape[0])
    input_grad = polynorm_input_grad(x, grad, inverse_norms, dots, weight, x.shape[-1])
    weight_grad = (inverse_norms * dots).sum(0).flip(0)
    # Per-row sums first: a reduction of the same shape as the row dots, which a compiler fuses into the
    # same pass over grad (a whole-tensor sum would be a pass of its own).
    bias_grad = grad.to(inverse_norms.dtype).sum(-1).sum().reshape(1)
    return input_grad, weight_grad, bias_grad


def polynomial_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """Σ_k c_k z^k + b with z = relu(x) if `relu` else x; [rows, w] → [rows, w] in x's dtype."""
    dtype = compute_dtype(x.dtype)
    z = x.to(dtype)
    if relu:
        z = torch.relu(z)
    coefficients = ascending_coefficients(weight, dtype)
    order = weight.shape[0]
    accumulator = coefficients[order - 1]
    for k in range(order - 1, 0, -1):
        accumulator = coefficients[k - 1] + z * accumulator
    return (z * accumulator + bias.detach().to(dtype)).to(x.dtype)


def polynomial_backward(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [rows, w] in x's dtype, d weight [r] highest power first, d bias [1]) in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    gc = grad.to(dtype)
    z = torch.relu(xc) if relu else xc
    coefficients = ascending_coefficients(weight, dtype)
    order = weight.shape[0]
    derivative = order * coefficients[order - 1]
    for k in range(order - 1, 0, -1):
        derivative = k * coefficients[k - 1] + z * derivative
    input_grad = gc * derivative
    if relu:
        input_grad = torch.where(xc > 0, input_grad, torch.zeros_like(input_grad))
    product = gc
    weight_grads = []
    for _ in range(order):
        product = product * z
        weight_grads.append(product.sum())
    weight_grad = torch.stack(weight_grads).flip(0)
    return input_grad.to(x.dtype), weight_grad, gc.sum().reshape(1)
