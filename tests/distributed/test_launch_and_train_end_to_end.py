"""End to end through the launchers and `polycom-lm train`: FSDP × TP 2 and DeepSpeed ZeRO 2 on 2 ranks
reproduce the single-process run (losses and gradient norms per step), a TP 2 checkpoint resumes on one
process with the uninterrupted losses, and `polycom-lm checkpoint consolidate` turns either engine's
checkpoint into the same loadable model. Also: every launcher prints its command and passes the config and
overrides through unchanged."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from engine_harness import REPOSITORY

pytestmark = pytest.mark.slow


def environment(**extra: str) -> dict[str, str]:
    result = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPOSITORY))
    result.setdefault("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))
    result.update(extra)
    return result


def launch(script: str, *arguments: str, **extra_environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPOSITORY / "launch" / script), *arguments],
        cwd=REPOSITORY, env=environment(**extra_environment), capture_output=True, text=True, timeout=600,
    )


# ------------------------------------------------------------------------------------------- launchers


def test_launchers_print_their_command_and_pass_arguments_through_unchanged(tmp_path):
    arguments = ["my config.yaml", "optimizer.lr=3e-4", "data.train=[{source: 'a b'}]", "--resume"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\necho node7\necho node8\n")
    (fake_bin / "scontrol").chmod(0o755)
    cases = {
        "torchrun_single_node.sh": ({"NPROC_PER_NODE": "3"}, ["--standalone", "--nproc-per-node=3"]),
        "torchrun_multi_node.sh": (
            {"MASTER_ADDR": "node0", "NNODES": "4", "NPROC_PER_NODE": "8"},
            ["--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500"],
        ),
        "slurm.sbatch": (
            {"SLURM_JOB_NODELIST": "node[7-8]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
             "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(REPOSITORY), "PATH": f"{fake_bin}:{os.environ['PATH']}"},
            ["srun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-endpoint=node7:29500", "--rdzv-id=42"],
        ),
        "deepspeed.sh": ({"NPROC_PER_NODE": "2"}, ["deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank"]),
    }
    for script, (extra, expected_parts) in cases.items():
        completed = launch(script, *arguments, DRY_RUN="1", **extra)
        assert completed.returncode == 0, f"{script}: {completed.stderr}"
        printed = completed.stderr.strip().splitlines()[-1]
        assert printed.startswith("+ ")
        # The printed line is shell-quoted: parsing it back gives exactly the arguments we passed.
        words = subprocess.run(["bash", "-c", f"printf '%s\\n' {printed[2:]}"], capture_output=True, text=True).stdout.splitlines()
        assert words[-len(arguments) - 2 :] == ["polycom_lm.cli", "train", *arguments], script
        for part in expected_parts:
            assert part in words, f"{script}: {part!r} not in {words}"


def test_launcher_without_config_prints_usage():
    completed = launch("torchrun_single_node.sh")
    assert completed.returncode == 2 and "usage:" in completed.stderr


# ------------------------------------------------------------------------------------- end-to-end runs
# `prepared_data` (a tiny tokenised corpus) comes from tests/conftest.py.


def run_config(prepared_data, output_dir: Path, max_steps: int = 4) -> dict:
    return {
        "base": str(REPOSITORY / "configs" / "model" / "tiny.yaml"),
        "model": {"activation": "swiglu", "max_seq_len": 32, "d_model": 32, "ffn_hidden_size": 64},
        "data": {"train": [{"source": str(prepared_data["train"])}],
                 "validation": [{"name": "heldout", "source": str(prepared_data["validation"])}]},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "training": {"output_dir": str(output_dir), "max_steps": max_steps, "seq_len": 16, "global_batch_size": 8,
                     "micro_batch_size": 2, "log_every_steps": 1, "eval_every_steps": 100, "save_every_steps": 2,
                     "seed": 3},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
        "evaluation": {"max_tokens": 256},
    }


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def numbers(metrics: Path) -> dict[int, tuple[float, float]]:
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    return {row["step"]: (row["loss"], row["grad_norm"]) for row in read_metrics(metrics) if row["kind"] == "train"}


def assert_resumes_on_one_process(raw: dict, config_path: Path, checkpoint: Path, expected: dict, norm_relative=None,
                                  relative: float = 1e-5) -> None:
    """`raw` (written to `config_path`) resumed on one process from the multi-rank `checkpoint` of step 2
    logs steps 3 and 4 with the uninterrupted run's losses (and gradient norms, given `norm_relative`)."""
    from polycom_lm.config import load_config
    from polycom_lm.train import run_training

    continued = numbers(run_training(load_config(write(config_path, raw)), resume=str(checkpoint)).metrics_path)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step][0] == pytest.approx(expected[step][0], rel=relative), f"step {step} loss"
        if norm_relative is not None:
            assert continued[step][1] == pytest.approx(expected[step][1], rel=norm_relative), f"step {step} grad norm"


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory) -> dict[str, Path]:
    from polycom_lm.config import load_config
    from polycom_lm.train import run_training

    root = tmp_path_factory.mktemp("launch_runs")
    run_training(load_config(write(root / "single.yaml", run_config(prepared_data, root / "single"))))
    for name, overrides in {
        "fsdp_tp2": ["distributed.backend=fsdp", "distributed.tp=2"],
        "zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
    }.items():
        config = write(root / f"{name}.yaml", run_config(prepared_data, root / name))
        completed = launch("torchrun_single_node.sh", str(config), *overrides, NPROC_PER_NODE="2")
        assert completed.returncode == 0, f"{name}:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return {"root": root, "single": root / "single", "fsdp_tp2": root / "fsdp_tp2", "zero2": root / "zero2"}


@pytest.mark.parametrize("engine", ["fsdp_tp2", "zero2"])
def test_two_rank_training_reproduces_the_single_process_run(runs, engine):
    expected = numbers(runs["single"] / "metrics.jsonl")
    measured = numbers(runs[engine] / "metrics.jsonl")
    assert sorted(measured) == [1, 2, 3, 4]
    for step, (loss, grad_norm) in expected.items():
        assert measured[step][0] == pytest.approx(loss, rel=1e-5), f"step {step} loss"
        assert measured[step][1] == pytest.approx(grad_norm, rel=1e-4), f"step {step} grad norm"


def test_tp2_run_resumes_on_one_process_with_the_uninterrupted_losses(runs, prepared_data):
    root = runs["root"]
    assert_resumes_on_one_process(run_config(prepared_data, root / "from_tp2"), root / "from_tp2.yaml",
                                  runs["fsdp_tp2"] / "checkpoints" / "step_2", numbers(runs["single"] / "metrics.jsonl"),
                                  norm_relative=1e-4)


def test_consolidated_checkpoints_of_every_engine_load_into_the_plain_model(runs, tmp_path):
    from safetensors.torch import load_file

    from polycom_lm.cli import main
    from polycom_lm.config import load_config
    from polycom_lm.models import build_model

    states = {}
    for engine in ("single", "fsdp_tp2", "zero2"):
        out = tmp_path / f"{engine}.safetensors"
        assert main(["checkpoint", "consolidate", str(runs[engine]), "--step", "4", "--out", str(out)]) == 0
        model = build_model(load_config(runs[engine] / "config.yaml").model, device="cpu")
        model.load_state_dict(load_file(str(out)), strict=True)
        states[engine] = model.state_dict()
    for engine in ("fsdp_tp2", "zero2"):
        for name, tensor in states["single"].items():
            assert (states[engine][name] - tensor).abs().max().item() < 1e-4, f"{engine}: {name}"
