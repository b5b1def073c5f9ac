"""Numerics of every activation with learnable coefficients (the PolyCom family, taken from the registry so
a new one is covered automatically): closed-form backward (gradcheck, float64) and every implementation
against an independent float64 evaluation of its definition, written out here term by term."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from polycom_lm.activations import ACTIVATIONS, build_activation
from polycom_lm.activations.kernels.fused import polynorm_fused
from polycom_lm.activations.kernels.reference import polynorm_paper_checkpointed, polynorm_reference

POLYCOM = sorted(name for name, cls in ACTIVATIONS.items() if cls.has_coefficients)


# PolyPReLU's negative slope at init (its docstring's value); the formulas below take it explicitly.
INITIAL_SLOPE = 0.25


def _power_terms(name: str, x: torch.Tensor, power: int, eps: float, slope: float) -> torch.Tensor:
    if name == "polynorm":
        return x**power / torch.sqrt((x ** (2 * power)).mean(-1, keepdim=True) + eps)
    if name == "polyrelu":
        return torch.clamp(x, min=0) ** power
    if name == "poly":
        return x**power
    if name == "polyprelu":
        return torch.where(x > 0, x, slope * x) ** power
    if name == "polyrelunorm":
        z = torch.clamp(x, min=0)
        return z**power / torch.sqrt((z ** (2 * power)).mean(-1, keepdim=True) + eps)
    pytest.fail(f"activation {name!r} has coefficients but no float64 definition in {__file__}: add it")


def formula_float64(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps=1e-6,
                    slope=INITIAL_SLOPE):
    """The definitions written out term by term, in float64: Σ_i weight[i] · term(x, r - i) + bias
    (`slope`: PolyPReLU's negative slope, a number or a tensor)."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    if isinstance(slope, torch.Tensor):
        slope = slope.double()
    order = weight.shape[0]
    out = torch.zeros_like(x) + bias
    for index in range(order):
        out = out + weight[index] * _power_terms(name, x, order - index, eps, slope)
    return out


def random_coefficients(order: int, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(order, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(1, generator=generator, dtype=torch.float64).to(dtype)
    return weight, bias


def as_function(name: str, impl: str, order: int = 3):
    """(x, weight, bias) -> activation `name` with these coefficients, through implementation `impl`."""
    module = build_activation(name, order=order, impl=impl)
    return lambda x, weight, bias: functional_call(module, {"weight": weight, "bias": bias}, (x,))


def test_the_polycom_family_is_read_from_the_registry():
    assert {"polynorm", "polyrelu", "poly", "polyprelu", "polyrelunorm"} <= set(POLYCOM)


@pytest.mark.parametrize("name", POLYCOM)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_fused_backward_passes_gradcheck_in_float64(name, order):
    weight, bias = random_coefficients(order, torch.float64)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(as_function(name, "fused", order), inputs)


@pytest.mark.parametrize("name", POLYCOM)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_impl_matches_float64_formula_in_fp32_with_grads(name, impl):
    module = build_activation(name, impl=impl)
    weight, bias = random_coefficients(3)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    slope = getattr(module, "negative_slope", None)
    if slope is not None:
        with torch.no_grad():
            slope.fill_(-0.3)  # away from the init, and negative: the branch must use the value given
    x = torch.randn(5, 7, 33).requires_grad_()
    grad_out = torch.randn(5, 7, 33)
    out = module(x)
    assert out.dtype == torch.float32
    out.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    s64 = torch.tensor([-0.3], dtype=torch.float64, requires_grad=True)
    expected = formula_float64(name, x64, w64, b64, slope=s64)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-4)
    if slope is not None:
        torch.testing.assert_close(slope.grad.double(), s64.grad, rtol=1e-4, atol=1e-4)
    else:
        assert s64.grad is None or s64.grad.abs().max() == 0  # the other definitions do not use a slope


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", POLYCOM)
def test_fused_half_precision_matches_reference_and_keeps_dtype(name, dtype):
    weight, bias = random_coefficients(3)
    x = torch.randn(16, 64).to(dtype)
    grad_out = torch.randn(16, 64).to(dtype)
    results = []
    for impl in ("fused", "reference"):
        xi = x.clone().requires_grad_()
        wi, bi = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        out = as_function(name, impl)(xi, wi, bi)
        out.backward(grad_out)
        results.append((out, xi.grad, wi.grad, bi.grad))
    (out, dx, dw, db), (ref_out, ref_dx, ref_dw, ref_db) = results
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    # Both compute in fp32 and round once to the half dtype: at most one ulp apart.
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), ref_dx.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(db, ref_db, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_polynorm_fp16_large_inputs_do_not_overflow(impl):
    # |x| up to 2000: x⁶ ≈ 6e19 overflows fp16 (max 65504) many times over, but not fp32.
    x = (torch.rand(4, 128) * 4000 - 2000).to(torch.float16).requires_grad_()
    module = build_activation("polynorm", impl=impl)
    out = module(x)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    expected = formula_float64("polynorm", x.detach(), module.weight.detach(), module.bias.detach())
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)


def test_float64_stays_float64():
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for name in POLYCOM:
        module = build_activation(name, impl="fused").double()
        out = module(x)
        assert out.dtype == torch.float64
        slope = getattr(module, "negative_slope", INITIAL_SLOPE)
        torch.testing.assert_close(out, formula_float64(name, x.detach(), module.weight, module.bias, slope=slope).detach())


def test_fused_accepts_non_contiguous_input():
    weight, bias = random_coefficients(3)
    x = torch.randn(12, 10).t().requires_grad_()  # [10, 12], non-contiguous
    out = polynorm_fused(x, weight, bias)
    out.sum().backward()
    x2 = x.detach().contiguous().requires_grad_()
    polynorm_reference(x2, weight, bias).sum().backward()
    torch.testing.assert_close(out, polynorm_reference(x.detach(), weight, bias))
    torch.testing.assert_close(x.grad, x2.grad)


def test_polyrelu_gradient_at_zero_and_negative_inputs_is_zero():
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 2.0]], requires_grad=True)
    out = build_activation("polyrelu", impl="fused")(x)
    out.sum().backward()
    assert x.grad[0, :3].eq(0).all() and (x.grad[0, 3:] > 0).all()
    torch.testing.assert_close(out[0, :3], torch.zeros(3))


def test_paper_checkpointed_polynorm_equals_ours():
    weight, bias = random_coefficients(3)
    x = torch.randn(6, 40, requires_grad=True)
    out = polynorm_paper_checkpointed(x, weight, bias)
    torch.testing.assert_close(out, polynorm_fused(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("order", [1, 3])
def test_polyprelu_slope_gradient_passes_gradcheck_in_float64(impl, order):
    """The learnable slope is the one parameter the other PolyCom definitions lack: gradcheck it together
    with x, weight and bias, on inputs of both signs."""
    module = build_activation("polyprelu", order=order, impl=impl).double()
    weight, bias = random_coefficients(order, torch.float64, seed=1)
    x = torch.randn(4, 9, dtype=torch.float64)
    slope = torch.tensor([0.17], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias, slope)]

    def function(x, weight, bias, slope):
        return functional_call(module, {"weight": weight, "bias": bias, "negative_slope": slope}, (x,))

    assert torch.autograd.gradcheck(function, inputs)


def test_polyprelu_with_zero_slope_is_polyrelu_and_with_unit_slope_is_poly():
    x = torch.randn(6, 20, dtype=torch.float64)
    weight, bias = random_coefficients(3, torch.float64, seed=2)
    prelu = build_activation("polyprelu", impl="fused").double()
    parameters = {"weight": weight, "bias": bias}
    for slope, twin in ((0.0, "polyrelu"), (1.0, "poly")):
        expected = functional_call(build_activation(twin, impl="reference").double(), parameters, (x,))
        got = functional_call(prelu, {**parameters, "negative_slope": torch.tensor([slope], dtype=torch.float64)}, (x,))
        torch.testing.assert_close(got, expected)


def test_polyrelunorm_is_polynorm_of_relu_and_ignores_negative_inputs():
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    weight, bias = random_coefficients(3, torch.float64, seed=3)
    parameters = {"weight": weight, "bias": bias}
    out = functional_call(build_activation("polyrelunorm", impl="fused").double(), parameters, (x,))
    expected = functional_call(build_activation("polynorm", impl="reference").double(), parameters, (x.clamp(min=0),))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad[x <= 0].eq(0).all() and x.grad[x > 0].ne(0).all()
