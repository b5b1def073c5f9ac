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

PolyReLUNorm is PolyNorm of z = relu(x) (`relu=True` in every PolyNorm function): the formulas above hold
with z in place of x, and dx = dz · [x > 0]. PolyPReLU is the polynomial of z = prelu(x) = x (x > 0) or a·x
(x <= 0) with a learnable slope a: dx = g · p'(z) · (1 or a), da = Σ g · p'(z) · x · [x <= 0].
"""

from __future__ import annotations

import torch

from polycom_lm.activations.kernels.reference import compute_dtype


def ascending_coefficients(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [r] (highest power first) → [r] with entry k-1 the coefficient of x^k, in `dtype`."""
    return weight.detach().flip(0).to(dtype)


def _base(x: torch.Tensor, relu: bool) -> torch.Tensor:
    """x in the compute dtype, through relu when `relu` (PolyReLUNorm's z)."""
    xc = x.to(compute_dtype(x.dtype))
    return torch.relu(xc) if relu else xc


def polynorm_row_sums(x: torch.Tensor, order: int, relu: bool = False) -> torch.Tensor:
    """x [rows, w] → [rows, r]: Σ_j z^(2k) for k = 1..r (z = relu(x) if `relu` else x), compute dtype."""
    xc = _base(x, relu)
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
    x: torch.Tensor, inverse_norms: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """out = Σ_k c_k inv_k z^k + b by Horner's rule; x [rows, w] → out [rows, w] in x's dtype."""
    dtype = compute_dtype(x.dtype)
    xc = _base(x, relu)
    order = weight.shape[0]
    gamma = inverse_norms * ascending_coefficients(weight, dtype)  # [rows, r]
    accumulator = gamma[:, order - 1 : order]
    for k in range(order - 1, 0, -1):
        accumulator = gamma[:, k - 1 : k] + xc * accumulator
    out = xc * accumulator + bias.detach().to(dtype)
    return out.to(x.dtype)


def polynorm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-device PolyNorm (PolyReLUNorm if `relu`): x [rows, w] → (out [rows, w], inverse norms [rows, r])."""
    sums = polynorm_row_sums(x, weight.shape[0], relu)
    inverse_norms = polynorm_inverse_norms(sums, x.shape[-1], eps)
    return polynorm_forward_from_inverse_norms(x, inverse_norms, weight, bias, relu), inverse_norms


def polynorm_row_dots(x: torch.Tensor, grad: torch.Tensor, order: int, relu: bool = False) -> torch.Tensor:
    """(x, grad) [rows, w] → [rows, r]: Σ_j grad · z^k for k = 1..r, in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    xc = _base(x, relu)
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
    relu: bool = False,
) -> torch.Tensor:
    """dx [rows, w] in x's dtype, from the (reduced) row dots; see the module docstring."""
    dtype = compute_dtype(x.dtype)
    xc = _base(x, relu)
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
    input_grad = gc * alpha_sum - xc * beta_sum
    if relu:
        input_grad = torch.where(xc > 0, input_grad, torch.zeros_like(input_grad))
    return input_grad.to(x.dtype)


def polynorm_coefficient_grads(
    grad: torch.Tensor, inverse_norms: torch.Tensor, local_dots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d weight [r] highest power first, d bias [1]) in the compute dtype."""
    weight_grad = (inverse_norms * local_dots).sum(0).flip(0)
    bias_grad = grad.sum(dtype=inverse_norms.dtype).reshape(1)  # accumulates in fp32 without an fp32 copy
    return weight_grad, bias_grad


def polynorm_backward(
    x: torch.Tensor, grad: torch.Tensor, inverse_norms: torch.Tensor, weight: torch.Tensor, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-device PolyNorm (PolyReLUNorm if `relu`) backward: (dx [rows, w], d weight [r], d bias [1])."""
    dots = polynorm_row_dots(x, grad, weight.shape[0], relu)
    input_grad = polynorm_input_grad(x, grad, inverse_norms, dots, weight, x.shape[-1], relu)
    weight_grad = (inverse_norms * dots).sum(0).flip(0)
    # Per-row sums first: a reduction of the same shape as the row dots, which a compiler fuses into the
    # same pass over grad (a whole-tensor sum would be a pass of its own).
    bias_grad = grad.sum(-1, dtype=inverse_norms.dtype).sum().reshape(1)
    return input_grad, weight_grad, bias_grad


def _polynomial_of(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Σ_k c_k z^k + b (Horner) in z's dtype."""
    coefficients = ascending_coefficients(weight, z.dtype)
    order = weight.shape[0]
    accumulator = coefficients[order - 1]
    for k in range(order - 1, 0, -1):
        accumulator = coefficients[k - 1] + z * accumulator
    return z * accumulator + bias.detach().to(z.dtype)


def _polynomial_derivative(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_k k c_k z^(k-1) in z's dtype."""
    coefficients = ascending_coefficients(weight, z.dtype)
    order = weight.shape[0]
    derivative = order * coefficients[order - 1]
    for k in range(order - 1, 0, -1):
        derivative = k * coefficients[k - 1] + z * derivative
    return derivative


def _coefficient_grads(grad: torch.Tensor, z: torch.Tensor, order: int) -> torch.Tensor:
    """d/dc of Σ_k c_k z^k: [Σ g z^k for k = r..1], highest power first."""
    product = grad
    weight_grads = []
    for _ in range(order):
        product = product * z
        weight_grads.append(product.sum())
    return torch.stack(weight_grads).flip(0)


def polynomial_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """Σ_k c_k z^k + b with z = relu(x) if `relu` else x; [rows, w] → [rows, w] in x's dtype."""
    z = x.to(compute_dtype(x.dtype))
    if relu:
        z = torch.relu(z)
    return _polynomial_of(z, weight, bias).to(x.dtype)


def polynomial_backward(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, relu: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [rows, w] in x's dtype, d weight [r] highest power first, d bias [1]) in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    gc = grad.to(dtype)
    z = torch.relu(xc) if relu else xc
    input_grad = gc * _polynomial_derivative(z, weight)
    if relu:
        input_grad = torch.where(xc > 0, input_grad, torch.zeros_like(input_grad))
    return input_grad.to(x.dtype), _coefficient_grads(gc, z, weight.shape[0]), gc.sum().reshape(1)


def _prelu(xc: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(xc > 0, xc, slope * xc)


def prelu_polynomial_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor
) -> torch.Tensor:
    """PolyPReLU: Σ_k c_k z^k + b with z = prelu(x) (negative slope `slope` [1]); [rows, w] → [rows, w]."""
    dtype = compute_dtype(x.dtype)
    z = _prelu(x.to(dtype), slope.detach().to(dtype))
    return _polynomial_of(z, weight, bias).to(x.dtype)


def prelu_polynomial_backward(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, slope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [rows, w] in x's dtype, d weight [r] highest power first, d bias [1], d slope [1]); the last
    three in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    xc = x.to(dtype)
    gc = grad.to(dtype)
    a = slope.detach().to(dtype)
    positive = xc > 0
    z = torch.where(positive, xc, a * xc)
    grad_z = gc * _polynomial_derivative(z, weight)  # dL/dz
    input_grad = torch.where(positive, grad_z, a * grad_z)
    slope_grad = torch.where(positive, torch.zeros_like(grad_z), grad_z * xc).sum().reshape(1)
    weight_grad = _coefficient_grads(gc, z, weight.shape[0])
    return input_grad.to(x.dtype), weight_grad, gc.sum().reshape(1), slope_grad
