"""Exact resume for real: a training process killed with SIGKILL and restarted reproduces the
uninterrupted run's losses and gradient norms bitwise (fp32 on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from trainer_test_helpers import REPO, cli_environment, run_cli, run_config, train_rows, write_config

pytestmark = pytest.mark.slow

MAX_STEPS = 10


def _config(prepared_data, folder, name):
    # Steps of ~0.1 s and a checkpoint every 2 steps give the kill below room to land mid-run.
    raw = run_config(prepared_data, folder / name, max_steps=MAX_STEPS, global_batch_size=16, micro_batch_size=8,
                     seq_len=32, save_every_steps=2, eval_every_steps=0, keep_last_checkpoints=2)
    return write_config(folder / f"{name}.yaml", raw)


def test_sigkilled_run_resumes_bitwise_identical(prepared_data, tmp_path):
    reference = _config(prepared_data, tmp_path, "reference")
    interrupted = _config(prepared_data, tmp_path, "interrupted")
    run_cli("train", str(reference), "--no-progress")

    process = subprocess.Popen(
        [sys.executable, "-m", "polycom_lm.cli", "train", str(interrupted), "--no-progress"],
        cwd=REPO, env=cli_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pointer = tmp_path / "interrupted" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if pointer.is_file() and pointer.read_text().strip() == "step_4":
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed mid-way"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = train_rows(tmp_path / "interrupted" / "metrics.jsonl")[-1]["step"]
    assert killed_at < MAX_STEPS

    run_cli("train", str(interrupted), "--no-progress")  # same command: resumes from `latest` by itself

    expected = [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in train_rows(tmp_path / "reference" / "metrics.jsonl")]
    resumed = [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in train_rows(tmp_path / "interrupted" / "metrics.jsonl")]
    assert [step for step, *_ in resumed] == list(range(1, MAX_STEPS + 1))  # no duplicated or missing steps
    assert resumed == expected  # bitwise: floats round-trip exactly through JSON
