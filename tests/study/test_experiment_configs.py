"""The experiment configs carry the paper's protocol (settings cited from the official code beside each
key), and every study file in configs/ expands into valid runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from polycom_lm.config import load_config
from polycom_lm.study.grid import main_runs, sweep_runs
from polycom_lm.study.spec import load_study
from polycom_lm.train.optim import build_schedule
from polycom_lm.train.validation import validate_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
STUDIES = sorted(EXPERIMENTS.glob("*/study.yaml")) + sorted((EXPERIMENTS / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_study_file_expands_into_valid_runs(path):
    spec = load_study(path)
    runs = main_runs(spec) + sweep_runs(spec)
    assert runs and len({run.name for run in runs}) == len(runs)


def test_dense_1b_follows_the_official_megatron_script():
    config = load_config(EXPERIMENTS / "dense_1b" / "polynorm.yaml")
    validate_config(config)
    model, optimizer, schedule = config.model, config.optimizer, config.schedule
    assert (model.attention_dropout, model.hidden_dropout) == (0.1, 0.1)
    assert model.vocab_size == 32000  # the LLaMA vocabulary of the paper
    assert (model.init_std, model.init_depth_scaled, model.init_truncation) == (0.013975, True, None)
    assert (optimizer.weight_decay, optimizer.weight_decay_embeddings, optimizer.weight_decay_norms,
            optimizer.weight_decay_activation) == (0.1, 0.1, 0.0, 0.0)
    assert (schedule.warmup_tokens, schedule.warmup_start_ratio, schedule.decay_tokens) == (620_000_000, 0.0, 0)
    assert config.training.max_steps * config.training.seq_len * config.training.global_batch_size == pytest.approx(100e9, rel=1e-4)


def test_olmoe_follows_the_official_config_with_a_decay_horizon_far_beyond_the_run():
    config = load_config(EXPERIMENTS / "olmoe_1b_7b" / "polynorm.yaml")
    validate_config(config)  # decay_tokens (5T) longer than the run (200B) is valid
    model, optimizer, schedule = config.model, config.optimizer, config.schedule
    assert (model.init_std, model.init_truncation, model.init_depth_scaled) == (0.02, 3.0, False)
    assert (optimizer.weight_decay_embeddings, optimizer.weight_decay_norms, optimizer.weight_decay_activation) == (0.1, 0.1, 0.0)
    assert (schedule.warmup_tokens, schedule.warmup_start_ratio, schedule.decay_tokens) == (10_485_760_000, 0.1, 5e12)
    tokens_per_step = config.training.seq_len * config.training.global_batch_size
    assert schedule.warmup_tokens / tokens_per_step == 2500
    lr = build_schedule(schedule, config.training.max_steps, tokens_per_step)
    assert lr.multiplier(tokens_per_step) == pytest.approx(0.1, abs=1e-3)  # warmup starts at 0.1 × lr
    assert lr.multiplier(config.training.max_steps * tokens_per_step) > 0.99  # nearly constant over 200B tokens


def test_the_cpu_ladder_has_five_activations_at_sizes_spanning_16x_on_the_cpu_studys_data():
    import dataclasses

    from polycom_lm.models.flops import parameter_counts

    spec = load_study(EXPERIMENTS / "ladder_cpu" / "study.yaml")
    runs = main_runs(spec)
    assert set(spec.grid["model.activation"]) == {"relu", "gelu", "swiglu", "polyrelu", "polynorm"}
    assert len(spec.grid["training.seed"]) in (2, 3)
    sizes = {run.grid["size"]: parameter_counts(dataclasses.replace(run.config.model, activation="swiglu"))["non_embedding"]
             for run in runs}
    assert len(sizes) >= 4 and max(sizes.values()) / min(sizes.values()) >= 16
    cpu_study = load_config(EXPERIMENTS / "study_cpu" / "base.yaml")
    for run in runs:
        training = run.config.training
        tokens_per_step = training.global_batch_size * training.seq_len
        assert abs(training.max_steps * tokens_per_step - 20 * sizes[run.grid["size"]]) <= tokens_per_step / 2
        assert run.config.data == cpu_study.data  # TinyStories, its tokenizer and validation split
        assert run.config.schedule.name == "cosine" and run.config.schedule.decay_steps == 0  # ends with the run
