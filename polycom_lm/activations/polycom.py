"""The PolyCom activations (ICLR 2025): PolyNorm, PolyReLU, and the compositions of the paper's ablation.

    PolyReLU(x)     = Σ_i w_i relu(x)^(r-i) + b
    PolyNorm(x)     = Σ_i w_i N(x^(r-i)) + b,        N(y) = y / sqrt(mean(y², last dim) + eps)
    Poly(x)         = Σ_i w_i x^(r-i) + b             (no composition: the un-normalised polynomial)
    PolyPReLU(x)    = Σ_i w_i prelu(x)^(r-i) + b,    prelu(x) = x if x > 0 else a·x, a learnable
    PolyReLUNorm(x) = Σ_i w_i N(relu(x)^(r-i)) + b   (PolyNorm of relu(x))

`weight` [r] is initialised to 1/r (weight[0] multiplies the highest power), `bias` [1] to 0, PolyPReLU's
`negative_slope` a [1] to 0.25 (PyTorch's `nn.PReLU` default, He et al. 2015). None is gated:
[..., w] → [..., w]. The implementation (`impl`) is one of `kernels.select.IMPLS`; all of them compute in
fp32 for half-precision inputs and return the input's dtype, and the fused ones keep only x (and per-row
inverse norms for the normalised ones) for backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from polycom_lm.activations.kernels import reference
from polycom_lm.activations.kernels.fused import polynomial_fused, polynorm_fused, prelu_polynomial_fused
from polycom_lm.activations.kernels.select import IMPLS, fused_backend, resolve_impl
from polycom_lm.activations.registry import ACTIVATIONS, Activation
from polycom_lm.errors import ConfigError


class _PolynomialCoefficients(Activation):
    """Shared parameters and checks of the PolyCom family."""

    has_coefficients = True

    def __init__(self, order: int = 3, impl: str = "auto"):
        super().__init__()
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ConfigError(f"{type(self).__name__} order (model.activation_order) must be an integer >= 1, got {order!r}")
        if impl not in IMPLS:
            raise ConfigError(f"activation impl (model.activation_impl) {impl!r} is not one of {', '.join(IMPLS)}")
        self.order = order
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(order))
        self.bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0 / self.order)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"order={self.order}, impl={self.impl!r}"


class _ReLUOrPlainPolynomial(_PolynomialCoefficients):
    relu: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.impl, x.device, x.numel())
        if impl == "reference":
            if self.relu:
                return reference.polyrelu_reference(x, self.weight, self.bias)
            return reference.polynomial_reference(x, self.weight, self.bias)
        if impl == "compiled":
            from polycom_lm.activations.kernels.compiled import polynomial_compiled

            return polynomial_compiled(x, self.weight, self.bias, self.relu)
        return polynomial_fused(x, self.weight, self.bias, self.relu, fused_backend(x.device))


@ACTIVATIONS.register("polyrelu")
class PolyReLU(_ReLUOrPlainPolynomial):
    """Σ_i weight[i] · relu(x)^(r-i) + bias; [..., w] → [..., w]."""

    relu = True


@ACTIVATIONS.register("poly")
class Poly(_ReLUOrPlainPolynomial):
    """Σ_i weight[i] · x^(r-i) + bias, without normalisation (the paper's ablation); [..., w] → [..., w]."""

    relu = False


@ACTIVATIONS.register("polyprelu")
class PolyPReLU(_PolynomialCoefficients):
    """Σ_i weight[i] · prelu(x)^(r-i) + bias with prelu(x) = x for x > 0 and negative_slope · x otherwise
    (one learnable slope per module, init 0.25); [..., w] → [..., w]. The paper's PReLU composition."""

    INITIAL_SLOPE = 0.25

    def __init__(self, order: int = 3, impl: str = "auto"):
        super().__init__(order, impl)
        # Created after the coefficients: reset_parameters (called by the base) skips it until it exists.
        self.negative_slope = nn.Parameter(torch.full((1,), self.INITIAL_SLOPE))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        slope = getattr(self, "negative_slope", None)
        if slope is not None:
            with torch.no_grad():
                slope.fill_(self.INITIAL_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.impl, x.device, x.numel())
        if impl == "reference":
            return reference.polyprelu_reference(x, self.weight, self.bias, self.negative_slope)
        if impl == "compiled":
            from polycom_lm.activations.kernels.compiled import prelu_polynomial_compiled

            return prelu_polynomial_compiled(x, self.weight, self.bias, self.negative_slope)
        return prelu_polynomial_fused(x, self.weight, self.bias, self.negative_slope, fused_backend(x.device))


@ACTIVATIONS.register("polynorm")
class PolyNorm(_PolynomialCoefficients):
    """Σ_i weight[i] · N(x^(r-i)) + bias, N normalising over the last dim; [..., w] → [..., w].

    Tensor parallelism: set `row_sum_reducer` (an all-reduce SUM over the tensor-parallel group, applied
    to a [rows, r] fp32 tensor) and `full_width` (the unsharded width) when the last dim holds a column
    shard; the norms then span the full row. The gradients of `weight` and `bias` are then this shard's
    share and must be summed over the group like any replicated parameter's partial gradient.
    """

    normalizes_over_width = True
    relu = False  # PolyReLUNorm: the powers of relu(x)

    def __init__(self, order: int = 3, impl: str = "auto", eps: float = 1e-6):
        super().__init__(order, impl)
        self.eps = float(eps)
        self.row_sum_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.full_width: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_impl(self.impl, x.device, x.numel())
        reducer, width, relu = self.row_sum_reducer, self.full_width, self.relu
        if impl == "reference":
            base = torch.relu(x) if relu else x
            return reference.polynorm_reference(base, self.weight, self.bias, self.eps, reducer, width)
        if impl == "compiled":
            if reducer is None:
                from polycom_lm.activations.kernels.compiled import polynorm_compiled

                return polynorm_compiled(x, self.weight, self.bias, self.eps, relu)
            return polynorm_fused(x, self.weight, self.bias, self.eps, "inductor", reducer, width, relu)
        return polynorm_fused(x, self.weight, self.bias, self.eps, fused_backend(x.device), reducer, width, relu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


@ACTIVATIONS.register("polyrelunorm")
class PolyReLUNorm(PolyNorm):
    """Σ_i weight[i] · N(relu(x)^(r-i)) + bias, N normalising over the last dim (PolyNorm of relu(x), the
    paper's ReLU + norm composition); [..., w] → [..., w]. Tensor parallelism as for PolyNorm."""

    relu = True
