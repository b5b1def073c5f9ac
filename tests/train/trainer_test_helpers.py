"""Helpers shared by the trainer tests (configs for tiny runs, running the CLI, reading metrics)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "configs" / "model" / "tiny.yaml"


def run_config(prepared_data: dict[str, Path], output_dir: Path, **training) -> dict:
    """A raw config dict for a seconds-fast run of the tiny model on the test corpus."""
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "log_every_steps": 1,
        "eval_every_steps": 2,
        "save_every_steps": 2,
        "seed": 7,
    }
    settings.update(training)
    return {
        "base": str(TINY_MODEL),
        "experiment": "trainer_test",
        "model": {"activation": "polynorm", "max_seq_len": 64},
        "data": {
            "train": [{"source": str(prepared_data["train"])}],
            "validation": [{"name": "heldout", "source": str(prepared_data["validation"])}],
        },
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "training": settings,
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
        "evaluation": {"max_tokens": 1024},
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def load(raw: dict, overrides: list[str] | None = None):
    from polycom_lm.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        return load_config(write_config(Path(folder) / "config.yaml", raw), overrides)


def cli_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["OMP_NUM_THREADS"] = "1"  # also under torchrun: ranks x threads must not exceed the cores
    environment["WANDB_MODE"] = "disabled"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(key, None)
    return environment


def run_cli(*arguments: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", cli_environment())
    process = subprocess.run(
        [sys.executable, "-m", "polycom_lm.cli", *arguments],
        cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs,
    )
    if check and process.returncode != 0:
        raise AssertionError(f"polycom-lm {' '.join(arguments)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return process


def run_cli_here(capsys, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """`polycom-lm ARGUMENTS` in this process (about 4 s faster than `run_cli`: no interpreter start or
    imports), as a CompletedProcess. For runs whose numbers are not compared bitwise with a subprocess's."""
    from polycom_lm.cli import main

    capsys.readouterr()  # what earlier code printed is not this command's output
    code = main(list(arguments))
    captured = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"polycom-lm {' '.join(arguments)} failed ({code}):\n{captured.err[-3000:]}")
    return subprocess.CompletedProcess(["polycom-lm", *arguments], code, captured.out, captured.err)


def train_in_background(config_path: Path, ready: Callable[[], bool], failure: str, poll_s: float = 0.005,
                        timeout_s: float = 240, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start `polycom-lm train CONFIG --no-progress` in a subprocess and return it, still running, once
    `ready()` holds (or after `timeout_s`); `failure` is the assertion message if it ended first. `log`:
    a file for its stdout and stderr (else discarded); `env`: extra environment variables."""
    output = open(log, "w", encoding="utf-8") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "polycom_lm.cli", "train", str(config_path), "--no-progress"],
        cwd=REPO, env={**cli_environment(), **(env or {})}, stdout=output, stderr=subprocess.STDOUT if log else output,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(poll_s)
    assert process.poll() is None, failure
    return process


def logged_step(run: Path, step: int) -> Callable[[], bool]:
    """Whether `run`'s metrics.jsonl holds the training row of `step` (or a later one)."""
    metrics = run / "metrics.jsonl"

    def ready() -> bool:
        try:
            text = metrics.read_text(encoding="utf-8")
        except OSError:
            return False
        return any(f'"step": {later},' in text for later in range(step, step + 50))

    return ready


def latest_is(run: Path, step_folder: str) -> Callable[[], bool]:
    """Whether `run`'s checkpoints/latest names `step_folder` (e.g. "step_4")."""
    pointer = run / "checkpoints" / "latest"
    return lambda: pointer.is_file() and pointer.read_text().strip() == step_folder


def train_rows(metrics_path: Path) -> list[dict]:
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    return [row for row in read_metrics(metrics_path) if row["kind"] == "train"]


def train_in_process(capsys, config_path, *arguments: str) -> tuple[int, str]:
    """`polycom-lm train CONFIG ARGUMENTS --no-progress` in this process: (exit status, last stderr line)."""
    completed = run_cli_here(capsys, "train", str(config_path), *arguments, "--no-progress", check=False)
    error = completed.stderr.strip().splitlines()
    return completed.returncode, error[-1] if error else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path, with its bytes (to show nothing was touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
