"""Ladders in study files: sizes crossed with the grid, budgets as multiples of tokens per parameter (or
fixed), the per-size rules (LR ∝ N^exponent or 1/width, batch ∝ N^exponent, warmup in tokens per parameter,
a cosine or WSD schedule as long as each run), parameter matching at every size, per-size overrides of a
rule, the per-size LR sweep, and one-line errors for ladders that cannot run."""

from __future__ import annotations

import dataclasses
import math

import pytest

from polycom_lm.cli import main as cli
from polycom_lm.models import ffn_width
from polycom_lm.models.flops import parameter_counts
from polycom_lm.study.grid import main_runs, sweep_runs
from polycom_lm.study.ladder import matrix_parameters
from polycom_lm.study.spec import load_study
from polycom_lm.train.optim import build_schedule
from study_helpers import write_study

SIZES = {
    "xs": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 64},
    "s": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_hidden_size": 128},
    "m": {"model.d_model": 96, "model.n_layers": 3, "model.n_heads": 4, "model.ffn_hidden_size": 256},
}
GRID = {"model.activation": ["relu", "swiglu", "polynorm"], "training.seed": [0, 1]}
REFERENCE = 100_000


def ladder(**changes) -> dict:
    settings = {"sizes": SIZES, "budget": {"tokens_per_parameter": 2, "multiples": [1]},
                "lr": {"rule": "power", "exponent": -1 / 3, "reference_parameters": REFERENCE},
                "warmup": {"tokens_per_parameter": 0.1}}
    settings.update(changes)
    return settings


def study(tmp_path, prepared_data, grid=GRID, **changes):
    return load_study(write_study(tmp_path, prepared_data, grid, ladder=ladder(**changes)))


def non_embedding(run) -> int:
    return parameter_counts(run.config.model)["non_embedding"]


def test_sizes_cross_the_grid_and_every_run_follows_the_rules(tmp_path, prepared_data):
    runs = main_runs(study(tmp_path, prepared_data))
    assert len(runs) == 3 * 3 * 2
    assert runs[0].name == "size-xs_activation-relu_seed-0" and runs[0].variant == "size-xs_activation-relu"
    for run in runs:
        training, schedule = run.config.training, run.config.schedule
        N = parameter_counts(dataclasses.replace(run.config.model, activation="swiglu"))["non_embedding"]
        tokens_per_step = training.global_batch_size * training.seq_len
        assert training.max_steps == round(2 * N / tokens_per_step)  # 1x of 2 tokens per parameter
        assert run.config.optimizer.lr == pytest.approx(3e-3 * (N / REFERENCE) ** (-1 / 3), rel=1e-3)
        assert schedule.warmup_steps == math.ceil(0.1 * N / tokens_per_step)
        lr = build_schedule(schedule, training.max_steps, tokens_per_step)
        # The cosine reaches its floor at this run's own last step, not at some other run's.
        assert lr.multiplier(training.max_steps) == pytest.approx(schedule.lr_min_ratio, abs=1e-6)
        assert lr.multiplier(training.max_steps // 2) > 2 * schedule.lr_min_ratio
        assert run.grid["size"] in SIZES and run.grid["budget"] == "1x"
    steps = {run.grid["size"]: run.config.training.max_steps for run in runs}
    assert steps["xs"] < steps["s"] < steps["m"]


def test_non_gated_activations_are_parameter_matched_at_every_size(tmp_path, prepared_data):
    runs = main_runs(study(tmp_path, prepared_data))
    for size, settings in SIZES.items():
        at_size = {run.grid["model.activation"]: run for run in runs if run.grid["size"] == size}
        assert ffn_width(at_size["relu"].config.model) == 3 * settings["model.ffn_hidden_size"] // 2
        assert ffn_width(at_size["swiglu"].config.model) == settings["model.ffn_hidden_size"]
        matrices = {activation: matrix_parameters(run.config.model) for activation, run in at_size.items()}
        assert len(set(matrices.values())) == 1, matrices
        # PolyNorm adds only its own coefficients (w0, w1, w2, b) per layer.
        assert non_embedding(at_size["polynorm"]) - non_embedding(at_size["swiglu"]) == 4 * settings["model.n_layers"]


def test_several_budgets_name_the_runs_and_scale_the_tokens(tmp_path, prepared_data):
    spec = study(tmp_path, prepared_data, {"model.activation": ["swiglu"]}, budget={"tokens_per_parameter": 2,
                                                                                    "multiples": [1, 4]})
    runs = {run.name: run for run in main_runs(spec)}
    one, four = runs["size-m_budget-1x_activation-swiglu"], runs["size-m_budget-4x_activation-swiglu"]
    assert four.config.training.max_steps == pytest.approx(4 * one.config.training.max_steps, abs=2)
    assert one.config.optimizer.lr == four.config.optimizer.lr  # the LR rule follows N, not D
    fixed = study(tmp_path / "fixed", prepared_data, {"model.activation": ["swiglu"]}, budget={"tokens": [2000, 8000]},
                  warmup={"steps": 1})
    steps = {run.name: run.config.training.max_steps for run in main_runs(fixed)}
    assert steps["size-xs_budget-2K_activation-swiglu"] == steps["size-m_budget-2K_activation-swiglu"] == 8  # 256/step
    assert steps["size-m_budget-8K_activation-swiglu"] == 31


def test_batch_rule_width_rule_wsd_and_a_size_override(tmp_path, prepared_data):
    spec = study(tmp_path, prepared_data, {"model.activation": ["swiglu"]},
                 batch={"rule": "power", "exponent": 2 / 3, "reference_parameters": 20_000, "multiple_of": 4},
                 lr={"rule": "width", "reference_d_model": 64}, schedule={"name": "wsd", "decay_fraction": 0.25},
                 size_overrides={"m": {"optimizer.lr": 1.0e-3}})
    runs = {run.grid["size"]: run.config for run in main_runs(spec)}
    batches = {size: config.training.global_batch_size for size, config in runs.items()}
    assert batches["xs"] < batches["s"] < batches["m"] and all(b % 4 == 0 for b in batches.values())
    assert runs["xs"].optimizer.lr == pytest.approx(3e-3 * 64 / 32)
    assert runs["s"].optimizer.lr == pytest.approx(3e-3)
    assert runs["m"].optimizer.lr == 1.0e-3  # the size's own value replaces the rule
    for config in runs.values():
        assert config.schedule.name == "wsd"
        assert config.schedule.decay_steps == round(0.25 * config.training.max_steps)


def test_size_rule_generates_named_sizes(tmp_path, prepared_data):
    spec = load_study(write_study(tmp_path, prepared_data, {"model.activation": ["swiglu"]}, ladder={
        **{k: v for k, v in ladder().items() if k != "sizes"},
        "size_rule": {"d_model": [32, 64], "n_layers": [1, 2], "head_dim": 16, "ffn_ratio": 8 / 3, "ffn_multiple": 16}}))
    assert spec.ladder.sizes == {
        "d32L1": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 80},
        "d64L2": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.ffn_hidden_size": 176}}


def test_lr_sweep_rule_sweeps_every_size_with_shorter_runs(tmp_path, prepared_data):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu"]}, select_lr=True,
                       lr_sweep={"values": [1e-3, 3e-3]}, ladder=ladder(lr={"rule": "sweep", "budget_fraction": 0.5}))
    spec = load_study(path)
    sweep = sweep_runs(spec)
    assert len(sweep) == 3 * 2 and {run.variant for run in sweep} == {f"size-{s}_activation-swiglu" for s in SIZES}
    main = {run.variant: run for run in main_runs(spec)}
    for run in sweep:
        assert run.config.training.max_steps == round(0.5 * main[run.variant].config.training.max_steps)
    assert all(run.lr_pending for run in main.values())


BAD_LADDERS = [
    ({"lr": None}, "ladder.lr is missing; choose a rule"),
    ({"lr": {"rule": "power", "exponent": -0.33}}, "ladder.lr: rule power needs reference_parameters"),
    ({"lr": {"rule": "cubic"}}, "ladder.lr.rule must be one of power, width, sweep, fixed"),
    ({"budgets": {"tokens_per_parameter": 20}}, "unknown ladder key 'budgets' (did you mean 'budget'?)"),
    ({"sizes": {"xs": SIZES["xs"]}}, "a ladder needs at least 2 sizes"),
    ({"sizes": {**SIZES, "xs": {**SIZES["xs"], "model.ffn_width": 96}}}, "sets model.ffn_width, one width for every"),
    ({"sizes": {**SIZES, "xs": {"optimizer.lr": 1e-3}}}, "ladder.sizes.xs sets no model key"),
    ({"sizes": {**SIZES, "xs": {"model.d_modl": 8}}}, "(did you mean 'model.d_model'?)"),
    ({"budget": {"multiples": [1], "tokens": [1000]}}, "takes multiples (of tokens_per_parameter · N) or tokens, not both"),
    ({"budget": {"multiples": [1, 1]}}, "lists a value twice"),
    ({"warmup": {"fraction": 0.1, "steps": 3}}, "ladder.warmup takes one of"),
    ({"warmup": {"tokens_per_parameter": 50}}, "too few for its"),
    ({"schedule": {"name": "constant"}}, "ladder.schedule.name must be cosine, linear or wsd"),
    ({"lr": {"rule": "sweep"}}, "ladder.lr.rule is sweep but select_lr is not true"),
    ({"sizes": None, "size_rule": {"d_model": [24, 32], "n_layers": 1, "head_dim": 16}}, "d_model 24 is not a multiple"),
]


@pytest.mark.parametrize("changes, message", BAD_LADDERS, ids=[m[:40] for _, m in BAD_LADDERS])
def test_a_ladder_that_cannot_run_is_one_error_line(tmp_path, prepared_data, capsys, changes, message):
    settings = {key: value for key, value in ladder(**changes).items() if value is not None}
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu"]}, ladder=settings)
    assert cli(["study", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error


def test_keys_the_ladder_sets_may_not_be_in_the_grid_or_the_overrides(tmp_path, prepared_data, capsys):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu"], "training.max_steps": [4, 8]},
                       ladder=ladder())
    assert cli(["study", str(path), "--dry-run"]) == 2
    assert "training.max_steps is set by the ladder" in capsys.readouterr().err
    path = write_study(tmp_path / "b", prepared_data, {"model.activation": ["swiglu"]}, ladder=ladder(),
                       overrides={"model.d_model": 48})
    assert cli(["study", str(path), "--dry-run"]) == 2
    assert "model.d_model is set by the ladder" in capsys.readouterr().err
    path = write_study(tmp_path / "c", prepared_data, {"model.activation": ["swiglu"]}, select_lr=True, ladder=ladder())
    assert cli(["study", str(path), "--dry-run"]) == 2
    assert "use lr: {rule: sweep}" in capsys.readouterr().err
