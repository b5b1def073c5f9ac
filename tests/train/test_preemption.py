"""Cluster life on one process, with real signals and real kills: a SIGTERM'd run saves one checkpoint,
exits 143 and the same command continues bitwise identically; a second signal during that save does not
cut it short; `training.time_limit` stops and saves before the budget; asynchronous checkpoints resume
bitwise and a SIGKILL in the middle of their background write never moves `latest`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from polycom_lm.faults import CRASH_ENVIRONMENT
from trainer_test_helpers import (
    latest_is,
    load,
    logged_step,
    run_cli,
    run_config,
    train_in_background,
    train_rows,
    write_config,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 10


def _raw(prepared_data, run: Path, **training) -> dict:
    # The shape of test_exact_resume's runs: steps of ~0.05 s, room for a signal to land mid-run.
    settings = dict(max_steps=MAX_STEPS, global_batch_size=16, micro_batch_size=8, seq_len=32, save_every_steps=2,
                    eval_every_steps=0, keep_last_checkpoints=2)
    settings.update(training)
    return run_config(prepared_data, run, **settings)


def _numbers(run: Path) -> list[tuple]:
    return [(row["step"], row["loss"], row["grad_norm"], row["lr"]) for row in train_rows(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(prepared_data, tmp_path_factory) -> list[tuple]:
    """(step, loss, grad norm, lr) of every step of the run nothing interrupts, in a subprocess as the
    interrupted runs are."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_cli("train", str(write_config(folder / "run.yaml", _raw(prepared_data, folder / "run"))), "--no-progress")
    return _numbers(folder / "run")


def test_sigterm_saves_one_checkpoint_exits_143_and_the_same_command_continues_bitwise(prepared_data, tmp_path, uninterrupted):
    run = tmp_path / "preempted"
    config = write_config(tmp_path / "preempted.yaml", _raw(prepared_data, run, save_every_steps=0))
    process = train_in_background(config, logged_step(run, 3), "the run ended before the signal", log=tmp_path / "log")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # a second one while it finishes the step or saves
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped < MAX_STEPS
    assert (run / "checkpoints" / f"step_{stopped}" / ".complete").is_file()
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["latest", f"step_{stopped}"]
    assert f"stopped after step {stopped} (SIGTERM)" in log and "Traceback" not in log
    assert _numbers(run)[-1][0] == stopped  # nothing logged beyond the saved step

    run_cli("train", str(config), "--no-progress")  # the same command: resumes from `latest` by itself
    assert _numbers(run) == uninterrupted  # bitwise: losses, gradient norms, learning rates


def test_a_second_signal_during_the_stop_checkpoint_does_not_cut_it_short(prepared_data, tmp_path, monkeypatch):
    """In this process: SIGUSR1 after step 3, and SIGUSR1 again from inside the checkpoint's write. The save
    completes, the run reports the first signal, and the checkpoint resumes."""
    from polycom_lm.distributed.engine import Engine
    from polycom_lm.train import run_training
    from polycom_lm.train.loop import Callback

    original = Engine.save_checkpoint
    writes = []

    def save_with_a_signal_inside(engine, directory):
        os.kill(os.getpid(), signal.SIGUSR1)  # handled at the next bytecode, i.e. in the middle of the save
        original(engine, directory)
        writes.append(directory.name)

    class SignalAfterStep3(Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(Engine, "save_checkpoint", save_with_a_signal_inside)
    previous = signal.getsignal(signal.SIGUSR1)
    raw = _raw(prepared_data, tmp_path / "run", save_every_steps=0)
    result = run_training(load(raw), extra_callbacks=(SignalAfterStep3(),))
    assert signal.getsignal(signal.SIGUSR1) == previous  # the handler is the run's only
    assert result.stopped is not None and result.stopped.exit_status == 128 + signal.SIGUSR1
    assert result.final_step == 3 and writes == [".tmp-step_3"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_3"
    resumed = run_training(load(raw))
    assert resumed.stopped is None and resumed.final_step == MAX_STEPS


def test_time_limit_stops_and_saves_before_the_budget(prepared_data, tmp_path, monkeypatch):
    """An 8-second budget on a run that would take minutes: it stops by itself, with its checkpoint complete,
    before the budget is spent (counted from POLYCOM_LM_START_TIME, as the launchers set it)."""
    from polycom_lm.train import run_training
    from polycom_lm.train.stop import START_TIME_ENVIRONMENT

    budget_s = 8.0
    start = time.time()
    monkeypatch.setenv(START_TIME_ENVIRONMENT, str(start))
    raw = _raw(prepared_data, tmp_path / "run", max_steps=100_000, save_every_steps=20, time_limit=f"{budget_s:g}s")
    result = run_training(load(raw))
    elapsed = time.time() - start
    assert result.stopped is not None and result.stopped.signal_number is None and result.stopped.exit_status == 0
    assert 1 < result.final_step < 100_000
    assert elapsed < budget_s, f"the run ended {elapsed:.2f} s after its start, past its {budget_s} s budget"
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{result.final_step}"


def test_async_checkpoints_resume_bitwise_and_a_kill_during_the_write_leaves_latest_complete(prepared_data, tmp_path, uninterrupted):
    run = tmp_path / "async"
    config = write_config(tmp_path / "async.yaml", _raw(prepared_data, run, async_checkpoint=True))
    # SIGKILL in the background thread once step 6's shards are written, before its folder is complete.
    process = train_in_background(config, lambda: False, "", timeout_s=0, env={CRASH_ENVIRONMENT: "async-write:6"})
    assert process.wait(timeout=120) == -signal.SIGKILL
    assert latest_is(run, "step_4")()
    assert (run / "checkpoints" / ".tmp-step_6").is_dir() and not (run / "checkpoints" / ".tmp-step_6" / ".complete").exists()

    run_cli("train", str(config), "--no-progress")  # resumes from step 4, writing asynchronously again
    assert _numbers(run) == uninterrupted
    assert latest_is(run, f"step_{MAX_STEPS}")() and not (run / "checkpoints" / ".tmp-step_6").exists()


def test_stop_and_checkpoint_settings_are_checked_before_anything_is_written(tmp_path):
    from trainer_test_helpers import run_config as raw_config

    from polycom_lm.errors import ConfigError
    from polycom_lm.train.validation import validate_config

    data = {"train": tmp_path / "train", "validation": tmp_path / "validation"}
    cases = {
        "training.time_limit='soon' is invalid": ["training.time_limit=soon"],
        "training.time_limit='-5m' is invalid": ["training.time_limit=-5m"],
        "training.stop_signals: 'SIGKILL' is not a signal a process can handle": ["training.stop_signals=[SIGKILL]"],
        "training.stop_signals: 'SIGNOPE'": ["training.stop_signals=[SIGNOPE]"],
        "distributed.timeout_seconds=0.0 is invalid": ["distributed.timeout_seconds=0"],
        "training.async_checkpoint=true is not available with distributed.backend=deepspeed": [
            "training.async_checkpoint=true", "distributed.backend=deepspeed"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            validate_config(load(raw_config(data, tmp_path / "run"), overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("90m", 5400), ("45s", 45), ("1d2h", 93600),
                                           ("03:50:00", 13800), ("50:00", 3000), ("2.5h", 9000), ("600", 600)])
def test_time_limits_read_as_people_write_them(text, seconds):
    from polycom_lm.train.stop import parse_duration

    assert parse_duration(text, "training.time_limit") == seconds
