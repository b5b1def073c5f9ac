"""Checks of the Triton kernels against the plain-autograd reference, run by
`test_triton_kernels.py` in a subprocess with TRITON_INTERPRET=1 (the interpreter must be chosen before
the kernels are defined, i.e. before `triton_polycom` is imported). Exits non-zero on a mismatch."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from polycom_lm.activations.kernels import closed_form, reference, triton_polycom, triton_polynomial  # noqa: E402
from polycom_lm.activations.kernels.fused import (  # noqa: E402
    polynomial_fused,
    polynorm_fused,
    prelu_polynomial_fused,
)

# Small blocks so that rows span several column blocks (the loops over a row are exercised).
triton_polycom.MAX_ROW_BLOCK = 16
triton_polynomial.ELEMENTWISE_BLOCK = 64


def run(function, x, weight, bias, grad, *extra):
    x, weight, bias, *extra = (t.detach().clone().requires_grad_() for t in (x, weight, bias, *extra))
    out = function(x, weight, bias, *extra)
    out.backward(grad)
    return (out.detach(), x.grad, weight.grad, bias.grad, *(t.grad for t in extra))


def compare(name, got, expected, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert len(got) == len(expected)
    for label, a, b in zip(("out", "dx", "dweight", "dbias", "dslope"), got, expected):
        assert a.dtype == b.dtype, (name, label, a.dtype, b.dtype)
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance, msg=f"{name} {label}")


def check_single_device(dtype, order):
    generator = torch.Generator().manual_seed(order)
    x = torch.randn(5, 37, generator=generator).to(dtype)
    grad = torch.randn(5, 37, generator=generator).to(dtype)
    weight = torch.randn(order, generator=generator)
    bias = torch.randn(1, generator=generator)
    cases = {
        "polynorm": (lambda *a: polynorm_fused(*a, backend="triton"), reference.polynorm_reference),
        "polyrelu": (lambda *a: polynomial_fused(*a, relu=True, backend="triton"), reference.polyrelu_reference),
        "poly": (lambda *a: polynomial_fused(*a, relu=False, backend="triton"), reference.polynomial_reference),
        "polyrelunorm": (
            lambda *a: polynorm_fused(*a, backend="triton", relu=True), reference.polyrelunorm_reference
        ),
    }
    for name, (kernel, plain) in cases.items():
        compare(f"{name} {dtype} r={order}", run(kernel, x, weight, bias, grad), run(plain, x, weight, bias, grad), dtype)
    slope = torch.tensor([0.3])
    compare(
        f"polyprelu {dtype} r={order}",
        run(lambda *a: prelu_polynomial_fused(*a, backend="triton"), x, weight, bias, grad, slope),
        run(reference.polyprelu_reference, x, weight, bias, grad, slope),
        dtype,
    )


def check_tensor_parallel_variant(dtype, relu):
    """Shard 0 of a row split in two, with a reducer that adds shard 1's sums / dots (computed by the
    PyTorch closed form), as the all-reduce would: the staged kernels must give the full-width result
    (PolyNorm, or PolyReLUNorm when `relu`)."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 40, generator=generator).to(dtype)
    grad = torch.randn(4, 40, generator=generator).to(dtype)
    weight, bias = torch.randn(3, generator=generator), torch.randn(1, generator=generator)
    plain = reference.polyrelunorm_reference if relu else reference.polynorm_reference
    expected = run(plain, x, weight, bias, grad)
    local, other = slice(0, 24), slice(24, 40)  # uneven shards on purpose
    other_contributions = [
        closed_form.polynorm_row_sums(x[:, other], 3, relu),
        closed_form.polynorm_row_dots(x[:, other].contiguous(), grad[:, other].contiguous(), 3, relu),
    ]

    def reducer(partial):
        return partial + other_contributions.pop(0)

    out, dx, dweight, dbias = run(
        lambda *a: polynorm_fused(*a, backend="triton", row_sum_reducer=reducer, full_width=40, relu=relu),
        x[:, local], weight, bias, grad[:, local],
    )
    assert not other_contributions, "the reducer must be called once in forward and once in backward"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected[0][:, local].float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dx.float(), expected[1][:, local].float(), rtol=tolerance, atol=tolerance)
    # The shard's coefficient-gradient share: Σ over its own columns only.
    inverse_norms = torch.rsqrt(closed_form.polynorm_row_sums(x, 3, relu) / 40 + 1e-6)
    local_dots = closed_form.polynorm_row_dots(x[:, local].contiguous(), grad[:, local].contiguous(), 3, relu)
    torch.testing.assert_close(dweight, (inverse_norms * local_dots).sum(0).flip(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbias, grad[:, local].float().sum().reshape(1), rtol=1e-4, atol=1e-4)


def check_one_pass_kernels(dtype):
    """The one-pass PolyNorm kernels (whole row in registers) against the two-pass ones and the reference,
    at a width that is not a power of two; they must really have run (their launch is counted)."""
    launches = []
    original = triton_polycom._one_pass_launch

    def counted(width):
        launches.append(width)
        return original(width)

    triton_polycom._one_pass_launch = counted
    try:
        for order in (1, 3):
            triton_polycom.ONE_PASS_MAX_WIDTH = 64
            check_single_device(dtype, order)
            triton_polycom.ONE_PASS_MAX_WIDTH = 0
    finally:
        triton_polycom._one_pass_launch = original
        triton_polycom.ONE_PASS_MAX_WIDTH = 0
    # polynorm and polyrelunorm, forward and backward, two orders
    assert launches == [37] * 8, launches


def main() -> int:
    for dtype in (torch.float32, torch.bfloat16):
        for order in (1, 3):
            check_single_device(dtype, order)
        check_one_pass_kernels(dtype)
        for relu in (False, True):
            check_tensor_parallel_variant(dtype, relu)
    print("triton kernels match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
