"""wandb (offline), TensorBoard, progress bar and profiler outputs of a run, and the MFU peak table."""

from __future__ import annotations

import io

import pytest
import torch

from polycom_lm.train import run_training
from polycom_lm.train.callbacks import ConsoleLogCallback, ProgressCallback
from polycom_lm.train.callbacks.wandb import wandb_settings
from polycom_lm.train.flops import lookup_peak, peak_flops
from trainer_test_helpers import load, run_config


def test_wandb_settings_default_group_tags_and_offline_mode(prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "my_run")
    del raw["logging"]["wandb_mode"]  # the default
    config = load(raw, ["logging.wandb_tags=[ablation]"])
    settings = wandb_settings(config, tmp_path / "my_run", environ={})
    assert settings["mode"] == "offline"
    assert settings["group"] == "trainer_test"  # the experiment name
    assert settings["name"] == "my_run"
    assert settings["tags"] == ["ablation", "polynorm", "dense"]
    assert settings["config"]["model"]["activation"] == "polynorm"
    custom = load(run_config(prepared_data, tmp_path / "r"), ["logging.wandb_group=sweep", "logging.wandb_run_name=a"])
    assert (wandb_settings(custom, tmp_path)["group"], wandb_settings(custom, tmp_path)["name"]) == ("sweep", "a")


def test_wandb_offline_tensorboard_and_profiler_write_their_files(prepared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the config's explicit `offline` wins over the environment
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = run_config(prepared_data, tmp_path / "run", max_steps=3, eval_every_steps=0, save_every_steps=0,
                     profile_start_step=2, profile_num_steps=1)
    raw["logging"].update({"wandb_mode": "offline", "tensorboard": True})
    console, plain_console = io.StringIO(), io.StringIO()
    run_training(load(raw), extra_callbacks=(ProgressCallback(stream=console), ConsoleLogCallback(plain_console)))
    assert "3/3" in console.getvalue() and "loss=" in console.getvalue() and "tok_s=" in console.getvalue()
    assert "step 3: validation set 'heldout': loss" in console.getvalue()
    plain_lines = plain_console.getvalue().splitlines()
    assert len(plain_lines) == 3 and plain_lines[-1].startswith("step 3/3: loss ") and "tokens/s MFU" in plain_lines[-1]
    output = tmp_path / "run"
    assert list((output / "wandb").glob("offline-run-*/run-*.wandb")), "no offline wandb run"
    assert (output / "wandb_run_id").is_file()
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert (output / "profile" / "trace_rank0.json").stat().st_size > 0


def test_peak_table_and_measured_fallback(monkeypatch):
    monkeypatch.delenv("POLYCOM_LM_PEAK_FLOPS", raising=False)
    assert lookup_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert lookup_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert lookup_peak("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert lookup_peak("NVIDIA A10G", "bf16") == 70e12
    assert lookup_peak("Some Future Chip", "bf16") is None
    measured = peak_flops(torch.device("cpu"), "fp32")
    assert "measured" in measured.source and measured.flops_per_second > 1e8


def test_peak_from_the_environment_and_a_bad_one_is_refused_before_any_write(prepared_data, monkeypatch, tmp_path):
    from polycom_lm.errors import ConfigError

    monkeypatch.setenv("POLYCOM_LM_PEAK_FLOPS", "2.5e11")
    given = peak_flops(torch.device("cpu"), "bf16")
    assert given.flops_per_second == 2.5e11 and given.source == "POLYCOM_LM_PEAK_FLOPS=2.5e11"
    for bad in ("fast", "0", "-3e11", "inf", "nan"):
        monkeypatch.setenv("POLYCOM_LM_PEAK_FLOPS", bad)
        with pytest.raises(ConfigError, match="POLYCOM_LM_PEAK_FLOPS=.*positive number"):
            peak_flops(torch.device("cpu"), "fp32")
    with pytest.raises(ConfigError, match="POLYCOM_LM_PEAK_FLOPS='nan'"):
        run_training(load(run_config(prepared_data, tmp_path / "run")))
    assert not (tmp_path / "run").exists()
