"""Exact resume for real: a training process killed with SIGKILL and restarted reproduces the
uninterrupted run's losses and gradient norms bitwise (fp32 on CPU), also with dropout on (its masks draw
from the RNG streams the checkpoint restores)."""

from __future__ import annotations

import os
import signal

import pytest

from trainer_test_helpers import latest_is, run_cli, run_config, train_in_background, train_rows, write_config

pytestmark = pytest.mark.slow

MAX_STEPS = 10


def _config(prepared_data, folder, name, dropout=0.0):
    # Steps of ~0.1 s and a checkpoint every 2 steps give the kill below room to land mid-run.
    raw = run_config(prepared_data, folder / name, max_steps=MAX_STEPS, global_batch_size=16, micro_batch_size=8,
                     seq_len=32, save_every_steps=2, eval_every_steps=0, keep_last_checkpoints=2)
    raw["model"].update(attention_dropout=dropout, hidden_dropout=dropout)
    return write_config(folder / f"{name}.yaml", raw)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_sigkilled_run_resumes_bitwise_identical(prepared_data, tmp_path, dropout):
    reference = _config(prepared_data, tmp_path, "reference", dropout)
    interrupted = _config(prepared_data, tmp_path, "interrupted", dropout)
    run_cli("train", str(reference), "--no-progress")

    process = train_in_background(interrupted, latest_is(tmp_path / "interrupted", "step_4"),
                                  "the run ended before it could be killed mid-way")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = train_rows(tmp_path / "interrupted" / "metrics.jsonl")[-1]["step"]
    assert killed_at < MAX_STEPS

    run_cli("train", str(interrupted), "--no-progress")  # same command: resumes from `latest` by itself

    expected = [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in train_rows(tmp_path / "reference" / "metrics.jsonl")]
    resumed = [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in train_rows(tmp_path / "interrupted" / "metrics.jsonl")]
    assert [step for step, *_ in resumed] == list(range(1, MAX_STEPS + 1))  # no duplicated or missing steps
    assert resumed == expected  # bitwise: floats round-trip exactly through JSON


def test_resume_restores_every_rng_stream_as_saved(prepared_data, tmp_path):
    """At the first step after a resume, the torch, Python and NumPy RNG states are exactly the ones the
    checkpoint saved: nothing (the MFU probe, wandb's start-up, callbacks) draws from them in between."""
    import random

    import numpy as np
    import torch

    from polycom_lm.train import run_training
    from polycom_lm.train.loop import Callback
    from polycom_lm.train.trainer_state import load_rng_state
    from trainer_test_helpers import load

    class FirstStepRNG(Callback):
        state = None

        def on_step_start(self, trainer):
            if self.state is None:
                self.state = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    raw = run_config(prepared_data, tmp_path / "run", max_steps=2, save_every_steps=1, eval_every_steps=0)
    run_training(load(raw))
    saved = load_rng_state(tmp_path / "run" / "checkpoints" / "step_2", rank=0)
    torch.manual_seed(12345)  # anything but the saved streams
    random.seed(12345)
    np.random.seed(12345)
    raw["training"]["max_steps"] = 3
    recorder = FirstStepRNG()
    run_training(load(raw), resume="latest", extra_callbacks=(recorder,))
    torch_state, python_state, numpy_state = recorder.state
    assert torch.equal(torch_state, saved["torch"])
    assert list(python_state[1]) == saved["python"][1] and python_state[2] == saved["python"][2]
    assert np.array_equal(numpy_state[1], saved["numpy"][1].numpy().astype(np.uint32))
    assert numpy_state[2:] == tuple(saved["numpy"][2:])
