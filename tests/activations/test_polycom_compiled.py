"""The `compiled` implementation: torch.compile'd closed-form bodies behind torch.library custom ops.
Equal to the plain-autograd reference, keeps only x (+ inverse norms), and compiles inside a whole
model without a graph break."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polycom_lm.activations import build_activation
from polycom_lm.activations.kernels.select import compile_available
from polycom_lm.activations.saved_memory import saved_tensor_bytes

pytestmark = pytest.mark.skipif(not compile_available("cpu"), reason="torch.compile does not work here")


def forward_backward(module, x, grad):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    out.backward(grad)
    return (out.detach(), x.grad, *(parameter.grad.clone() for parameter in module.parameters()))


@pytest.mark.parametrize("name", ["polynorm", "polyrelu", "polyprelu", "polyrelunorm"])
def test_compiled_matches_reference_in_fp32_and_bf16(name):
    compiled, plain = build_activation(name, impl="compiled"), build_activation(name, impl="reference")
    with torch.no_grad():
        for module in (compiled, plain):
            module.weight.copy_(torch.tensor([0.5, -1.25, 0.75]))
            module.bias.fill_(0.1)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, grad = torch.randn(2, 9, 48).to(dtype), torch.randn(2, 9, 48).to(dtype)
        got, expected = forward_backward(compiled, x, grad), forward_backward(plain, x, grad)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)
    x = torch.randn(18, 48, requires_grad=True)
    inverse_norms = 18 * 3 * 4 if compiled.normalizes_over_width else 0
    slope = 4 if name == "polyprelu" else 0
    assert saved_tensor_bytes(lambda: compiled(x)) == x.numel() * 4 + 3 * 4 + inverse_norms + slope


class TinyFFN(nn.Module):
    def __init__(self, impl: str):
        super().__init__()
        self.up = nn.Linear(16, 24, bias=False)
        self.activation = build_activation("polynorm", impl=impl)
        self.down = nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


@pytest.mark.parametrize("impl", ["compiled", "fused"])
def test_polynorm_compiles_inside_a_model_without_graph_break(impl):
    """`compiled`: an opaque custom op in the graph; `fused`: the autograd Function traced by Dynamo."""
    torch.manual_seed(0)
    model = TinyFFN(impl)
    x = torch.randn(4, 8, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled_model = torch.compile(model, fullgraph=True)
    out = compiled_model(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for got, expected in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_tensor_parallel_variant_matches_full_width():
    """Shard 0 of rows split in two, with a reducer that adds shard 1's row sums / dots as the all-reduce
    would: the compiled staged functions give the full-width output and input gradient."""
    from polycom_lm.activations.kernels import closed_form
    from polycom_lm.activations.kernels.fused import polynorm_fused
    from polycom_lm.activations.kernels.reference import polynorm_reference

    generator = torch.Generator().manual_seed(3)
    x, grad = torch.randn(4, 40, generator=generator), torch.randn(4, 40, generator=generator)
    weight, bias = torch.randn(3, generator=generator), torch.randn(1, generator=generator)
    full = x.clone().requires_grad_()
    polynorm_reference(full, weight, bias).backward(grad)
    expected_out = polynorm_reference(x, weight, bias)
    local, other = slice(0, 24), slice(24, 40)
    contributions = [
        closed_form.polynorm_row_sums(x[:, other], 3),
        closed_form.polynorm_row_dots(x[:, other], grad[:, other], 3),
    ]
    shard = x[:, local].clone().requires_grad_()
    out = polynorm_fused(shard, weight, bias, 1e-6, "inductor", lambda partial: partial + contributions.pop(0), 40)
    out.backward(grad[:, local])
    assert not contributions
    torch.testing.assert_close(out, expected_out[:, local], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shard.grad, full.grad[:, local], rtol=1e-5, atol=1e-5)
