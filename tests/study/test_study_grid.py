"""Study files → named runs with resolved configs: expansion order and naming, per-value overrides, the
settings the study adds (output folders, wandb group / run name / tags), the LR sweep's runs, and one-line
errors for bad study files."""

from __future__ import annotations

import pytest
import yaml

from polycom_lm.errors import ConfigError
from polycom_lm.study.grid import default_lr_values, main_runs, sweep_runs
from polycom_lm.study.spec import load_study, run_name
from study_helpers import write_study


def test_grid_expands_to_every_combination_named_by_its_values(prepared_data, tmp_path):
    path = write_study(
        tmp_path, prepared_data, {"model.activation": ["relu", "polynorm"], "training.seed": [0, 1]},
        per_value={"model.activation": {"polynorm": {"optimizer.lr": 0.002, "model.activation_order": 2}}},
        overrides={"training.max_steps": 3},
    )
    spec = load_study(path)
    runs = main_runs(spec)
    assert [run.name for run in runs] == [
        "activation-relu_seed-0", "activation-relu_seed-1", "activation-polynorm_seed-0", "activation-polynorm_seed-1",
    ]
    assert [run.variant for run in runs] == ["activation-relu"] * 2 + ["activation-polynorm"] * 2
    for run in runs:
        config = run.config
        assert config.model.activation == run.grid["model.activation"]
        assert config.training.seed == run.grid["training.seed"]
        assert config.training.max_steps == 3  # the study's overrides reach every run
        polynorm = run.grid["model.activation"] == "polynorm"
        assert config.optimizer.lr == (0.002 if polynorm else 3e-3)  # per-value: only where the value matches
        assert config.model.activation_order == (2 if polynorm else 3)
        assert config.training.output_dir == str(tmp_path / "out" / "runs" / run.name)
        assert run.config_path == tmp_path / "out" / "configs" / f"{run.name}.yaml"
        assert config.logging.wandb_group == "toy" and config.logging.wandb_run_name == run.name
        assert {"study:toy", f"activation={config.model.activation}", f"seed={config.training.seed}"} <= set(config.logging.wandb_tags)


def test_names_use_the_whole_key_when_two_grid_keys_end_alike():
    keys = ["optimizer.lr", "schedule.lr_min_ratio", "model.n_layers"]
    assert run_name({"optimizer.lr": 1e-3, "schedule.lr_min_ratio": 0.1, "model.n_layers": 2}, keys) == \
        "lr-0.001_lr_min_ratio-0.1_n_layers-2"
    assert run_name({"a.x": "b c", "b.x": 2.5e-05}, ["a.x", "b.x"]) == "a.x-b-c_b.x-2.5e-05"


def test_lr_sweep_runs_every_variant_at_every_candidate_with_the_first_seed(prepared_data, tmp_path):
    path = write_study(
        tmp_path, prepared_data, {"model.activation": ["relu", "polynorm"], "training.seed": [5, 6]},
        select_lr=True, lr_sweep={"overrides": {"training.max_steps": 2}},
    )
    spec = load_study(path)
    runs = sweep_runs(spec)
    assert default_lr_values(3e-3) == (1e-3, 3e-3, 9e-3)
    assert [run.name for run in runs] == [
        f"activation-{a}_lr-{lr}" for a in ("relu", "polynorm") for lr in ("0.001", "0.003", "0.009")
    ]
    assert {run.config.training.seed for run in runs} == {5}
    assert {run.config.training.max_steps for run in runs} == {2}
    assert runs[0].output_dir == tmp_path / "out" / "lr_sweep" / "runs" / runs[0].name
    pending = main_runs(spec)
    assert all(run.lr_pending for run in pending)
    chosen = main_runs(spec, {"activation-relu": 0.009, "activation-polynorm": 0.001})
    assert [run.config.optimizer.lr for run in chosen] == [0.009, 0.009, 0.001, 0.001]
    assert not any(run.lr_pending for run in chosen)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": {"model.activaton": ["relu"]}}, r"grid key 'model.activaton' is not a config key \(did you mean 'model.activation'\?\)"),
        ({"grid": {}}, "the grid is empty"),
        ({"grid": None}, "the grid is empty"),
        ({"grid": {"training.seed": []}}, "grid key 'training.seed' has no values"),
        ({"grid": {"training.seed": 3}}, "must have a list of values"),
        ({"grid": {"model": ["relu"]}}, "is a config section, not a setting"),
        ({"grid": {"training.seed": [1, 1]}}, "lists 1 more than once"),
        ({"overrides": {"training.max_step": 3}}, r"overrides key 'training.max_step' is not a config key \(did you mean 'training.max_steps'\?\)"),
        ({"per_value": {"model.activation": {"gelu": {}}}}, "per_value.model.activation names 'gelu', which is not among"),
        ({"per_value": {"training.seed": {0: {}}}}, "per_value key 'training.seed' is not a grid key"),
        ({"select_lr": True, "grid": {"optimizer.lr": [0.1, 0.2]}}, "both a grid key and chosen by select_lr"),
        ({"lr_sweep": {"values": [0.1, 0.2]}}, "select_lr is not true"),
        ({"select_lr": True, "lr_sweep": {"values": [0.1]}}, "at least two learning rates"),
        ({"grdi": {}}, r"unknown study key 'grdi' \(did you mean 'grid'\?\)"),
        ({"base": "missing.yaml"}, "base config .*missing.yaml not found"),
    ],
)
def test_bad_study_files_are_one_line_errors(prepared_data, tmp_path, change, message):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["relu", "polynorm"]})
    content = yaml.safe_load(path.read_text())
    content.update(change)
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message) as info:
        main_runs(load_study(path))
    assert "\n" not in str(info.value)


def test_a_value_the_config_refuses_names_the_study_and_run(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["relu", "nonesuch"]})
    with pytest.raises(ConfigError, match=r"study.yaml: run activation-nonesuch: model.activation: unknown activation 'nonesuch'"):
        main_runs(load_study(path))


def test_the_study_command_reports_a_bad_study_file_in_one_line(prepared_data, tmp_path, capsys):
    from polycom_lm.cli import main

    path = write_study(tmp_path, prepared_data, {"model.activaton": ["relu"]})
    assert main(["study", str(path), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "model.activation" in error


def test_launch_commands_of_the_local_and_torchrun_launchers(prepared_data, tmp_path):
    import sys

    from polycom_lm.study.runner import train_command

    (run,) = main_runs(load_study(write_study(tmp_path, prepared_data, {"training.seed": [4]})))
    assert train_command(run, "local", 1) == [sys.executable, "-m", "polycom_lm.cli", "train", str(run.config_path), "--no-progress"]
    assert train_command(run, "torchrun", 4)[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]


def test_runs_get_a_fresh_torchrun_store_per_attempt_unless_the_user_chose(monkeypatch):
    from polycom_lm.study.runner import train_environment

    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert train_environment()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # see launch/common.sh
    assert train_environment()["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    assert train_environment()["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"
