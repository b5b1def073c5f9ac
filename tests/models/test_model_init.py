"""Initialisation: meta build + to_empty + init_weights equals a direct build, every tensor is written,
the standard deviations follow the config, ties and RoPE tables survive device moves and dtype casts."""

import math
from pathlib import Path

import pytest
import torch

from polycom_lm.config import load_config
from polycom_lm.models import Transformer, build_model

TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def tiny(**overrides):
    config = load_config(TINY).model
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("activation", ["swiglu", "polynorm"])
def test_meta_build_then_to_empty_and_init_equals_direct_build(activation):
    config = tiny(activation=activation, tie_embeddings=activation == "polynorm")
    torch.manual_seed(7)
    direct = build_model(config, device="cpu")
    on_meta = build_model(config, device="meta")
    assert all(p.is_meta for p in on_meta.parameters())
    on_meta.to_empty(device="cpu")
    torch.manual_seed(7)
    on_meta.init_weights()
    assert states_equal(direct.state_dict(), on_meta.state_dict())
    torch.testing.assert_close(direct.rope.cos, on_meta.rope.cos, rtol=0, atol=0)
    input_ids = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(direct(input_ids), on_meta(input_ids), rtol=0, atol=0)


def test_init_weights_with_a_generator_is_reproducible_and_seed_dependent():
    model = build_model(tiny(), device="cpu")
    model.init_weights(torch.Generator().manual_seed(1))
    first = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights(torch.Generator().manual_seed(1))
    assert states_equal(first, model.state_dict())
    model.init_weights(torch.Generator().manual_seed(2))
    assert not torch.equal(first["layers.0.attention.q_proj.weight"], model.state_dict()["layers.0.attention.q_proj.weight"])


def test_init_weights_overwrites_every_parameter_and_buffer():
    model = build_model(tiny(activation="polynorm", qk_norm=True), device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan"))
    model.init_weights()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(tensor).all(), name
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            assert (parameter == 1).all(), name
    coefficients = model.layers[0].ffn.activation
    torch.testing.assert_close(coefficients.weight.detach(), torch.full((3,), 1 / 3))
    assert coefficients.bias.item() == 0


def test_standard_deviations_follow_init_std_and_depth_scaling():
    config = tiny(d_model=256, n_layers=8, n_heads=4, vocab_size=1024, ffn_hidden_size=512, init_std=0.02)
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    depth_scaled = 0.02 / math.sqrt(2 * 8)
    expected = {
        "tok_embeddings.weight": 0.02,
        "output.weight": 0.02,
        "layers.3.attention.q_proj.weight": 0.02,
        "layers.3.ffn.in_proj.weight": 0.02,
        "layers.3.attention.o_proj.weight": depth_scaled,
        "layers.3.ffn.out_proj.weight": depth_scaled,
    }
    parameters = dict(model.named_parameters())
    for name, std in expected.items():
        assert parameters[name].std().item() == pytest.approx(std, rel=0.05), name
        assert abs(parameters[name].mean().item()) < 0.1 * std, name
    config.init_depth_scaled = False
    flat = build_model(config, device="cpu")
    assert flat.layers[0].ffn.out_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_tied_embeddings_stay_tied_through_meta_and_share_one_gradient():
    model = build_model(tiny(tie_embeddings=True), device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    model(torch.randint(0, 512, (1, 8))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None
    untied = build_model(tiny(), device="cpu")
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_rope_tables_are_non_persistent_and_stay_float32_after_a_bf16_cast():
    model = build_model(tiny(), device="cpu")
    assert not any("rope" in key for key in model.state_dict())
    reference = model.rope.cos.clone()
    model.to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32
    torch.testing.assert_close(model.rope.cos, reference, rtol=0, atol=0)
    assert model.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 512, (1, 8))).dtype == torch.bfloat16


def test_direct_construction_initialises_like_the_config_says():
    torch.manual_seed(0)
    model = Transformer(tiny(init_std=0.05, d_model=128))
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_init_truncation_bounds_every_normal_draw_at_that_many_standard_deviations(family):
    """OLMoE's init: N(0, 0.02) cut at ±3σ, no depth scaling. With 2σ the bound is hit by ~5% of draws, so
    an untruncated init visibly exceeds it while the truncated one never does."""
    overrides = dict(init_std=0.02, init_depth_scaled=False, family=family)
    if family == "moe":
        overrides["moe"] = load_config(TINY).model.moe.__class__(num_experts=4, top_k=2, expert_hidden_size=32)
    torch.manual_seed(0)
    truncated = build_model(tiny(init_truncation=2.0, **overrides), device="cpu")
    torch.manual_seed(0)
    plain = build_model(tiny(**overrides), device="cpu")
    checked = 0
    for (name, value), (_, reference) in zip(truncated.named_parameters(), plain.named_parameters()):
        if value.ndim < 2:
            continue  # norm gains, activation coefficients: not drawn from a normal
        checked += 1
        assert value.abs().max() <= 2.0 * 0.02 + 1e-9, name
        assert value.std().item() == pytest.approx(0.02 * 0.880, rel=0.2), name  # std of N(0,1) cut at ±2σ
        if value.numel() >= 2000:
            assert reference.abs().max() > 2.0 * 0.02, name  # the bound does something
    assert checked >= (6 if family == "dense" else 7)


def test_dropout_acts_only_while_training():
    config = tiny(attention_dropout=0.3, hidden_dropout=0.3)
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    torch.manual_seed(0)
    plain = build_model(tiny(), device="cpu")
    input_ids = torch.randint(0, 512, (2, 16))
    model.train()
    torch.manual_seed(1)
    first = model(input_ids)
    second = model(input_ids)
    assert not torch.allclose(first, second)  # fresh masks every forward
    torch.manual_seed(1)
    torch.testing.assert_close(model(input_ids), first, rtol=0, atol=0)  # the masks come from torch's RNG
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(input_ids), plain(input_ids), rtol=0, atol=0)
