"""Parameter groups of AdamW and the learning-rate schedules, against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from polycom_lm.config import ModelConfig, OptimizerConfig, ScheduleConfig
from polycom_lm.models import build_model
from polycom_lm.train.optim import Schedule, build_optimizer, build_schedule, classify_parameters


def _tiny(activation: str, tie: bool = False):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden_size=64,
                         activation=activation, max_seq_len=32, tie_embeddings=tie)
    return build_model(config, device="cpu")


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_groups_cover_every_parameter_once_with_their_weight_decay(tie):
    model = _tiny("polynorm", tie=tie)
    groups = classify_parameters(model)
    names = {group: {name for name, _ in members} for group, members in groups.items()}
    all_parameters = {id(p) for p in model.parameters()}
    grouped = [id(p) for members in groups.values() for _, p in members]
    assert sorted(grouped) == sorted(all_parameters)  # each exactly once, tied weights included
    assert names["activation"] == {
        f"layers.{i}.ffn.activation.{n}" for i in range(2) for n in ("weight", "bias")
    }
    assert names["embeddings"] == {"tok_embeddings.weight"}
    assert all(name.endswith("norm.weight") for name in names["norms_biases"])
    assert ("output.weight" in names["matrices"]) is not tie
    assert "layers.0.ffn.in_proj.weight" in names["matrices"]

    config = OptimizerConfig(weight_decay=0.1, weight_decay_norms=0.01, weight_decay_embeddings=0.02,
                             weight_decay_activation=0.03)
    optimizer = build_optimizer(model, config)
    decay = {group["name"]: group["weight_decay"] for group in optimizer.param_groups}
    assert decay == {"matrices": 0.1, "norms_biases": 0.01, "embeddings": 0.02, "activation": 0.03}
    assert optimizer.defaults["fused"] is True  # fused AdamW is the default where the device supports it


def test_activation_coefficients_decay_only_with_their_own_setting():
    model = _tiny("polyrelu")
    coefficient = model.layers[0].ffn.activation.weight
    before = coefficient.detach().clone()
    matrix = model.layers[0].ffn.in_proj.weight
    matrix_before = matrix.detach().clone()
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5, weight_decay_activation=0.0))
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    assert torch.equal(coefficient, before)  # zero gradient and no decay: unchanged
    torch.testing.assert_close(matrix, matrix_before * (1 - 0.1 * 0.5))  # decoupled decay of matrices only


def _reference(name, progress, warmup, total, decay, min_ratio, warmup_start=0.0):
    """Learning-rate multiplier written out case by case (`decay`: wsd's final phase, or the cosine / linear
    horizon when not 0)."""
    if progress < warmup:
        return warmup_start + (1.0 - warmup_start) * progress / warmup
    if name == "constant":
        return 1.0
    if name == "wsd":
        start = total - decay
        return 1.0 if progress <= start else 1.0 - (1.0 - min_ratio) * (progress - start) / decay
    end = decay if decay else total
    fraction = min(1.0, (progress - warmup) / (end - warmup))
    if name == "linear":
        return 1.0 - (1.0 - min_ratio) * fraction
    return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * fraction)) / 2.0


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_schedules_match_reference_in_steps(name):
    decay = 30 if name == "wsd" else 0  # cosine / linear: 0 decays over the whole run
    schedule = build_schedule(
        ScheduleConfig(name=name, warmup_steps=10, decay_steps=decay, lr_min_ratio=0.1), max_steps=100, tokens_per_step=1
    )
    for step in range(1, 101):
        assert schedule.multiplier(step) == pytest.approx(_reference(name, step, 10, 100, decay, 0.1)), step
    assert schedule.multiplier(1) == pytest.approx(0.1)  # the first update already moves the weights
    assert schedule.multiplier(10) == pytest.approx(1.0)
    if name != "constant":
        assert schedule.multiplier(100) == pytest.approx(0.1)


def test_token_units_count_tokens_of_each_update():
    schedule = build_schedule(
        ScheduleConfig(name="linear", units="tokens", warmup_tokens=4096, lr_min_ratio=0.0),
        max_steps=10, tokens_per_step=1024,
    )
    assert schedule == Schedule("linear", 4096, 0, 10 * 1024, 0.0)
    from polycom_lm.train.optim import schedule_progress

    progress = [schedule_progress(ScheduleConfig(units="tokens"), step, 1024) for step in (1, 4, 10)]
    assert [schedule.multiplier(p) for p in progress] == pytest.approx([0.25, 1.0, 0.0])


def test_cosine_horizon_beyond_the_run_keeps_the_lr_near_its_peak_as_in_olmoe():
    """OLMoE-1B-7B-0924: warmup 10,485,760,000 tokens from 0.1 · lr, cosine to 0.1 · lr over t_max = 5e12 tokens,
    in a run of 200B tokens (4,194,304 tokens per step): the lr ends the run at 99.3% of its peak."""
    tokens_per_step, max_steps = 4_194_304, 47_684
    config = ScheduleConfig(
        name="cosine", units="tokens", warmup_tokens=10_485_760_000, warmup_start_ratio=0.1,
        decay_tokens=5_000_000_000_000, lr_min_ratio=0.1,
    )
    schedule = build_schedule(config, max_steps=max_steps, tokens_per_step=tokens_per_step)
    for step in (1, 1250, 2499, 2500, 2501, 20_000, max_steps):
        tokens = step * tokens_per_step
        expected = _reference("cosine", tokens, 10_485_760_000, max_steps * tokens_per_step, 5_000_000_000_000, 0.1, 0.1)
        assert schedule.multiplier(tokens) == pytest.approx(expected, rel=1e-12), step
    assert schedule.multiplier(tokens_per_step) == pytest.approx(0.1 + 0.9 / 2500)  # starts at 0.1 · lr
    end = schedule.multiplier(max_steps * tokens_per_step)
    assert 0.99 < end < 1.0  # nearly constant: the whole 200B run sits on the top of a 5T cosine
    assert end == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (200e9 - 10_485_760_000) / (5e12 - 10_485_760_000))), rel=1e-4)


def test_cosine_horizon_shorter_than_the_run_holds_the_floor_afterwards():
    schedule = build_schedule(ScheduleConfig(name="cosine", decay_steps=50, lr_min_ratio=0.2), 100, 1)
    assert schedule.multiplier(50) == pytest.approx(0.2)
    assert schedule.multiplier(80) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"warmup_start_ratio": 1.0}, "schedule.warmup_start_ratio=1.0 is invalid"),
        ({"warmup_steps": 10, "decay_steps": 10}, "decay must end after the warmup"),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(settings, message):
    from polycom_lm.config import config_from_dict
    from polycom_lm.errors import ConfigError
    from polycom_lm.train.validation import validate_config

    raw = {"data": {"train": [{"source": "builtin:pydoc"}]}, "schedule": settings}
    with pytest.raises(ConfigError, match=message):
        validate_config(config_from_dict(raw))
