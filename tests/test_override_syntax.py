"""Overrides in the three spellings (`key=value`, `--key=value`, `--key value`, plus `--flag` for a
boolean), anywhere after the command, for every command that takes a config; and `polycom-lm config`,
which prints the resolved config that `train` would run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polycom_lm.cli import main
from polycom_lm.commands.overrides import split_overrides
from polycom_lm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "experiments" / "quickstart" / "polynorm.yaml"


def test_every_spelling_becomes_key_equals_value_in_the_order_given():
    rest, overrides = split_overrides([
        "cfg.yaml", "--model.activation", "relu", "--no-progress", "optimizer.lr=1e-3", "--training.compile",
        "--resume", "--training.max_steps=5", "--experiment", "x", "--training.seed", "-3",
        "--distributed.sequence_parallel", "false", "--training.compile"])
    assert rest == ["cfg.yaml", "--no-progress", "--resume"]
    assert overrides == ["model.activation=relu", "optimizer.lr=1e-3", "training.compile=true",
                         "training.max_steps=5", "experiment=x", "training.seed=-3",
                         "distributed.sequence_parallel=false", "training.compile=true"]


def test_a_boolean_flag_before_the_config_path_does_not_swallow_it():
    assert split_overrides(["--training.compile", "cfg.yaml"]) == (["cfg.yaml"], ["training.compile=true"])
    # A non-boolean key takes the next token whatever it is; the config's type check judges it.
    assert split_overrides(["--model.activation", "cfg.yaml"]) == ([], ["model.activation=cfg.yaml"])


def test_options_paths_and_values_that_are_not_overrides_stay_for_argparse():
    tokens = ["runs/x=1/config.yaml", "--resume", "runs/a/checkpoints/step_5", "--log-level=DEBUG", "-h"]
    assert split_overrides(tokens) == (tokens, [])


@pytest.mark.parametrize("spelling", [
    ["model.activation=relu", "training.max_steps=70"],
    ["--model.activation=relu", "--training.max_steps=70"],
    ["--model.activation", "relu", "--training.max_steps", "70"],
])
def test_config_command_prints_the_same_resolved_yaml_for_each_spelling(capsys, spelling):
    assert main(["config", str(QUICKSTART), *spelling]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(QUICKSTART, ["model.activation=relu", "training.max_steps=70"]).to_dict()
    assert printed == expected
    assert printed["model"]["activation"] == "relu" and printed["training"]["max_steps"] == 70


def test_config_output_loads_back_into_the_same_config(capsys, tmp_path):
    assert main(["config", str(QUICKSTART), "--training.compile", "false", "--optimizer.lr", "2e-3"]) == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(capsys.readouterr().out, encoding="utf-8")
    assert load_config(saved) == load_config(QUICKSTART, ["training.compile=false", "optimizer.lr=2e-3"])


@pytest.mark.parametrize("command", ["config", "info"])
@pytest.mark.parametrize("bad, expected", [
    (["--model.activaton", "relu"], "did you mean 'activation'"),
    (["--modle.activation=relu"], "did you mean 'model'"),
    (["model.activation=polynorn"], "polynorm"),
    (["--training.max_steps", "many"], "training.max_steps"),
])
def test_every_spelling_gets_the_same_one_line_errors(capsys, command, bad, expected):
    assert main([command, str(QUICKSTART), *bad]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and expected in error and error.count("\n") == 1


def test_config_command_runs_trains_checks_before_printing(capsys):
    # A value the types accept but `train` refuses: warmup longer than the run.
    assert main(["config", str(QUICKSTART), "--training.max_steps", "5"]) == 2
    assert "schedule.warmup_steps=10 exceeds" in capsys.readouterr().err
    assert main(["config", str(QUICKSTART), "--world-size", "3"]) == 2  # 8 sequences over 3 ranks
    assert "not divisible" in capsys.readouterr().err
    assert capsys.readouterr().out == ""


def test_train_accepts_dashed_overrides_mixed_with_its_own_options(tmp_path):
    # End to end through the console script's argv; a tiny config that fails fast on purpose after parsing:
    # the override must have reached the config for the error to name it.
    process = subprocess.run(
        [sys.executable, "-m", "polycom_lm.cli", "train", str(QUICKSTART), "--no-progress",
         "--training.output_dir", str(tmp_path / "run"), "--model.activation", "polynorn"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert process.returncode == 2
    assert process.stderr.startswith("error: model.activation") and "polynorm" in process.stderr
