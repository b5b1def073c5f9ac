"""The `moe` model family: presets, parameter / FLOP accounting, auxiliary losses and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polycom_lm.config import load_config
from polycom_lm.models import build_model
from polycom_lm.models.flops import parameter_counts, training_flops_per_token

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("activation", ["swiglu", "polynorm", "polyrelu", "gelu", "relu"])
def test_olmoe_1b_7b_experiment_has_6_9b_total_and_1_3b_active_parameters(activation):
    config = load_config(CONFIGS / "experiments" / "olmoe_1b_7b" / f"{activation}.yaml")
    assert config.model.activation == activation
    counts = parameter_counts(config.model)
    # Hand count: embeddings + LM head, 16 × (attention 4·d² + full-width q/k norms + 2 norms + router E·d +
    # 64 experts of 3·d·1024 weights), final norm; PolyCom adds 4 coefficients per layer.
    d, layers, experts, vocab = 2048, 16, 64, 50304
    per_layer = 4 * d * d + 4 * d + experts * d + experts * 3 * d * 1024
    coefficients = 4 * layers if activation.startswith("poly") else 0
    assert counts["total"] == 2 * vocab * d + layers * per_layer + d + coefficients
    active_per_layer = per_layer - (experts - 8) * 3 * d * 1024
    assert counts["active"] == 2 * vocab * d + layers * active_per_layer + d + coefficients
    assert 6.85e9 < counts["total"] < 6.95e9 and 1.25e9 < counts["active"] < 1.32e9
    # PaLM accounting over active matmuls: 6 · (attention + router + 8 experts + head) + 6·L·H·Q·T.
    matmul = layers * (4 * d * d + experts * d + 8 * 3 * d * 1024) + vocab * d
    expected_flops = 6 * matmul + 6 * layers * d * config.training.seq_len
    assert training_flops_per_token(config.model, config.training.seq_len) == pytest.approx(expected_flops)


def small_moe(activation: str = "polynorm", **overrides):
    overrides = [f"model.{key}={value}" for key, value in overrides.items()]
    config = load_config(
        CONFIGS / "model" / "small_moe.yaml",
        [f"model.activation={activation}", "model.vocab_size=128", "model.d_model=32", "model.n_layers=2",
         "model.moe.expert_hidden_size=16", *overrides],
    )
    return config.model


def test_moe_model_reports_weighted_aux_losses_and_metrics_per_layer():
    config = small_moe()
    torch.manual_seed(0)
    model = build_model(config)
    input_ids = torch.randint(0, 128, (2, 16))
    logits = model(input_ids)
    losses = model.last_aux_losses
    assert set(losses) == {"load_balancing", "router_z"}
    layers = model.moe_layers()
    expected_balance = 0.01 * sum(layer.aux_losses["load_balancing"] for layer in layers) / len(layers)
    torch.testing.assert_close(losses["load_balancing"], expected_balance)
    expected_z = 0.001 * sum(layer.aux_losses["router_z"] for layer in layers) / len(layers)
    torch.testing.assert_close(losses["router_z"], expected_z)
    metrics = model.moe_metrics()
    for index in range(2):
        counts = layers[index].routing_statistics["tokens_per_expert"]
        assert counts.sum() == 2 * 16 * 2  # dropless: every token's two assignments are counted
        assert metrics[f"moe/layer_{index}/tokens_per_expert_min"] == counts.min().item()
        assert metrics[f"moe/layer_{index}/tokens_per_expert_max"] == counts.max().item()
        cv = (counts.std(correction=0) / counts.mean()).item()
        assert metrics[f"moe/layer_{index}/tokens_per_expert_cv"] == pytest.approx(cv)
        assert 0.0 < metrics[f"moe/layer_{index}/router_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    # The aux losses reach the router: their gradient alone moves it.
    model.zero_grad()
    sum(losses.values()).backward()
    assert layers[0].router.weight.grad.abs().sum() > 0


def test_zero_weighted_aux_losses_are_left_out():
    model = build_model(small_moe(**{"moe.lb_loss_weight": 0.0, "moe.z_loss_weight": 0.001}))
    model(torch.randint(0, 128, (1, 8)))
    assert set(model.last_aux_losses) == {"router_z"}


def test_small_moe_trains_loss_goes_down():
    torch.manual_seed(0)
    model = build_model(small_moe("polynorm", **{"moe.per_expert_coefficients": True}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids = torch.randint(0, 128, (4, 17))
    losses = []
    for _ in range(12):
        logits = model(input_ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), input_ids[:, 1:].reshape(-1))
        losses.append(loss.item())
        (loss + sum(model.last_aux_losses.values())).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.5
    coefficients = model.layers[0].ffn.experts.activation.weight
    assert not torch.allclose(coefficients[0], coefficients[1])  # per-expert coefficients learn separately


@pytest.mark.parametrize("activation", ["swiglu", "polynorm"])
def test_moe_model_under_bf16_autocast_routes_in_fp32_and_trains(activation):
    torch.manual_seed(0)
    model = build_model(small_moe(activation))
    input_ids = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids)
    assert logits.dtype == torch.bfloat16
    layer = model.layers[0].ffn
    assert layer.aux_losses["router_z"].dtype == torch.float32  # the router ran in fp32 under autocast
    (logits.float().logsumexp(-1).mean() + sum(model.last_aux_losses.values())).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
