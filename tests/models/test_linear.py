"""The projection layer's oneDNN path equals `F.linear` (values and gradients) and steps aside where it must."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models import build_model
from polycom_lm.models.linear import ONEDNN_AVAILABLE, Linear, linear, use_onednn

needs_onednn = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="PyTorch built without oneDNN")


def _grads(fn, x, weight, bias, grad_out):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    out = fn(x, weight, bias)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, bias.grad if bias is not None else None


@needs_onednn
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 37, 96), (130, 96), (2, 5, 7, 96)])
def test_onednn_linear_matches_float64_reference(shape, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(80, 96, generator=generator) / 10
    bias = torch.randn(80, generator=generator) if with_bias else None
    grad_out = torch.randn(*shape[:-1], 80, generator=generator)
    assert use_onednn(x, weight, bias)
    ours = _grads(lambda a, w, b: linear(a, w, b, "auto"), x, weight, bias, grad_out)
    exact = _grads(F.linear, x.double(), weight.double(), bias.double() if with_bias else None, grad_out.double())
    for mine, reference in zip(ours, exact):
        if reference is None:
            assert mine is None
            continue
        assert mine.dtype == torch.float32 and mine.shape == reference.shape
        torch.testing.assert_close(mine.double(), reference, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linear_takes_non_contiguous_input_and_skips_unneeded_grads():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 64, generator=generator).transpose(0, 1)  # [3, 40, 64], not contiguous
    weight = torch.randn(32, 64, generator=generator, requires_grad=True)
    out = linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    out.sum().backward()  # x needs no gradient: only the weight's is computed
    torch.testing.assert_close(weight.grad, torch.ones(3, 40, 32).flatten(0, 1).t() @ x.reshape(-1, 64))


def test_onednn_path_steps_aside_for_autocast_other_dtypes_and_aten():
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast still casts, as F.linear does
    assert not use_onednn(x.double(), weight.double())
    assert not use_onednn(x.bfloat16(), weight.bfloat16())
    partitioned = torch.nn.Parameter(weight.clone())
    partitioned.ds_id = 0  # what DeepSpeed ZeRO-3 tags its partitioned parameters with
    assert not use_onednn(x, partitioned)


def test_aten_impl_never_takes_the_onednn_path(monkeypatch):
    import polycom_lm.models.linear as linear_module

    def refuse(*args):
        raise AssertionError("oneDNN path taken with impl='aten'")

    monkeypatch.setattr(linear_module._OneDNNLinear, "apply", refuse)
    layer = Linear(16, 8, bias=True, impl="aten")
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="oneDNN path taken"):
        Linear(16, 8, impl="auto")(x) if ONEDNN_AVAILABLE else refuse()


@needs_onednn
def test_onednn_linear_compiles_without_graph_break():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 24, 32, generator=generator, requires_grad=True)
    weight = torch.randn(48, 32, generator=generator, requires_grad=True)

    def loss(a, w):
        return linear(a, w).relu().square().mean()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    got = torch.autograd.grad(compiled(x, weight), (x, weight))
    expected = torch.autograd.grad(loss(x, weight), (x, weight))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_impl_is_checked_and_models_agree_across_impls():
    with pytest.raises(ConfigError, match="linear_impl"):
        Linear(4, 4, impl="mkl")
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden_size=48, max_seq_len=16,
                         activation="polynorm")
    torch.manual_seed(0)
    auto = build_model(config, torch.device("cpu"))
    torch.manual_seed(0)
    aten = build_model(dataclasses.replace(config, linear_impl="aten"), torch.device("cpu"))
    assert all(isinstance(m, Linear) for m in (auto.output, auto.layers[0].attention.q_proj, auto.layers[0].ffn.in_proj))
    assert auto.output.impl == "auto" and aten.output.impl == "aten"
    assert auto.layers[0].ffn.out_proj.impl == "auto" and aten.layers[0].ffn.out_proj.impl == "aten"
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    auto_logits, aten_logits = auto(ids), aten(ids)
    torch.testing.assert_close(auto_logits, aten_logits, rtol=1e-5, atol=1e-5)
    auto_logits.square().mean().backward()
    aten_logits.square().mean().backward()
    for (name, a), b in zip(auto.named_parameters(), aten.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
