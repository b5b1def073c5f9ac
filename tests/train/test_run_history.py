"""A run's history is one line, and its folder holds only what it should, even when processes are killed
at the worst moments (real SIGKILLs at exact points of a checkpoint save, `POLYCOM_LM_CRASH_AT`)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from polycom_lm.faults import CRASH_ENVIRONMENT
from trainer_test_helpers import (REPO, cli_environment, run_cli, run_cli_here, run_config, train_in_background, train_rows,
                                  write_config)

pytestmark = pytest.mark.slow


def _config(prepared_data, tmp_path, name="run", **training):
    settings = {"max_steps": 6, "save_every_steps": 2, "eval_every_steps": 0, "keep_last_checkpoints": 3}
    settings.update(training)
    return write_config(tmp_path / f"{name}.yaml", run_config(prepared_data, tmp_path / name, **settings))


def _train_killed_at(config, point: str, *arguments: str) -> None:
    """`polycom-lm train CONFIG ARGUMENTS`, SIGKILLed by itself at checkpoint-save point `point`."""
    completed = run_cli("train", str(config), *arguments, "--no-progress", check=False,
                        env={**cli_environment(), CRASH_ENVIRONMENT: point})
    assert completed.returncode == -signal.SIGKILL, f"not killed at {point}: {completed.stderr[-2000:]}"


def test_resuming_from_an_earlier_checkpoint_retires_the_later_ones_even_if_killed(prepared_data, tmp_path, capsys, caplog):
    """Resume at step 2 with a new LR, killed while saving step 4 (written and marked complete, not yet
    renamed, `latest` not yet moved): a rerun continues the new line from that step 4, not the old run's
    step 6, and the abandoned checkpoints and rows are kept under retired/."""
    config = _config(prepared_data, tmp_path)
    run = tmp_path / "run"
    run_cli_here(capsys, "train", str(config), "--no-progress")
    old_rows = train_rows(run / "metrics.jsonl")
    _train_killed_at(config, "complete:4", "optimizer.lr=1e-3", "--resume", str(run / "checkpoints" / "step_2"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    completed = run_cli_here(capsys, "train", str(config), "optimizer.lr=1e-3", "--resume", "--no-progress")
    assert completed.returncode == 0
    assert "resuming from" in caplog.text and ".tmp-step_4" in caplog.text  # the log, in this process

    rows = train_rows(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["lr"] for row in rows[:2]] == [row["lr"] for row in old_rows[:2]]
    assert all(new["lr"] < old["lr"] for new, old in zip(rows[2:], old_rows[2:]))  # 1e-3 line, not 3e-3
    (retired,) = (run / "retired").iterdir()
    assert retired.name.endswith("-resumed-at-step_2")
    assert sorted(p.name for p in (retired / "checkpoints").iterdir()) == ["step_4", "step_6"]
    assert [row["step"] for row in train_rows(retired / "metrics.jsonl")] == [3, 4, 5, 6]
    assert (run / "config.before_step_2.yaml").is_file()


def test_a_kill_between_the_renames_of_a_resave_is_recovered(prepared_data, tmp_path):
    """Re-saving step 2 moves the old folder aside, then renames the new one into place; killed in
    between, `latest` names a missing folder. The next start renames the complete new folder into place."""
    from polycom_lm.checkpoint.folders import latest_checkpoint, recover_interrupted_writes, write_checkpoint

    checkpoints = tmp_path / "checkpoints"

    def save(marker: str) -> None:
        write_checkpoint(checkpoints, 2, lambda folder: (folder / "trainer_state.json").write_text(marker),
                         rank=0, barrier=lambda: None, keep_last=2)

    save("old")
    script = (
        "import sys; from pathlib import Path\n"
        "from polycom_lm.checkpoint.folders import write_checkpoint\n"
        "write_checkpoint(Path(sys.argv[1]), 2, lambda f: (f / 'trainer_state.json').write_text('new'),\n"
        "                 rank=0, barrier=lambda: None, keep_last=2)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, str(checkpoints)], cwd=REPO,
                               env={**cli_environment(), CRASH_ENVIRONMENT: "between-renames:2"})
    assert completed.returncode == -signal.SIGKILL
    assert not (checkpoints / "step_2").exists()  # the window: `latest` names a missing folder
    assert latest_checkpoint(checkpoints).name == ".tmp-step_2"  # planning (read-only) already finds it
    recover_interrupted_writes(checkpoints)
    assert latest_checkpoint(checkpoints) == checkpoints / "step_2"
    assert (checkpoints / "step_2" / "trainer_state.json").read_text() == "new"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_2"]


def test_a_kill_during_the_first_latest_write_resumes_from_the_complete_checkpoint(prepared_data, tmp_path, capsys):
    config = _config(prepared_data, tmp_path, max_steps=4)
    run = tmp_path / "run"
    _train_killed_at(config, "latest:2")
    checkpoints = run / "checkpoints"
    assert not (checkpoints / "latest").exists() and list(checkpoints.glob(".latest.tmp-*"))
    run_cli_here(capsys, "train", str(config), "--no-progress")
    assert [row["step"] for row in train_rows(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not list(checkpoints.glob(".latest.tmp-*"))
    assert (checkpoints / "latest").read_text().strip() == "step_4"


def test_a_second_run_in_the_same_folder_is_refused_and_a_dead_holder_is_taken_over(prepared_data, tmp_path, capsys):
    config = _config(prepared_data, tmp_path, max_steps=400, save_every_steps=0, log_every_steps=1)
    run = tmp_path / "run"
    first = train_in_background(config, (run / "metrics.jsonl").is_file,
                                "the first run ended before the second one started", poll_s=0.05)
    try:
        second = run_cli_here(capsys, "train", str(config), "--no-progress", check=False)
        assert second.returncode == 2
        error = second.stderr.strip().splitlines()[-1]
        assert "is in use by another run" in error and f"PID {first.pid}" in error
    finally:
        first.kill()
        first.wait()
    # The killed holder's lock file is still there, naming it, but nobody holds the lock: it is taken over.
    assert f'"pid": {first.pid}' in (run / ".polycom_lm.lock").read_text()
    rerun = run_cli_here(capsys, "train", str(config), "training.max_steps=2", "--overwrite", "--no-progress")
    assert "finished step 2" in rerun.stdout


def test_a_moved_run_folder_is_the_same_run(prepared_data, tmp_path, capsys):
    config = _config(prepared_data, tmp_path, max_steps=2)
    run_cli_here(capsys, "train", str(config), "--no-progress")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    completed = run_cli_here(capsys, "train", str(config), f"training.output_dir={tmp_path / 'moved'}",
                        f"data.cache_dir={tmp_path / 'elsewhere'}", "training.max_steps=3", "--resume", "--no-progress")
    assert "finished step 3" in completed.stdout
    moved = run_cli_here(capsys, "train", str(config), f"training.output_dir={tmp_path / 'moved'}", "training.max_steps=3",
                         "--no-progress")  # without --resume: a moved folder is not a changed config
    assert "finished step 3" in moved.stdout


def test_overwrite_removes_only_what_the_project_wrote(prepared_data, tmp_path, capsys):
    config = _config(prepared_data, tmp_path, max_steps=2)
    run = tmp_path / "run"
    run_cli_here(capsys, "train", str(config), "--no-progress")
    mine = {run / "checkpoints" / "notes.txt": "keep", run / "wandb" / "my_sweep.yaml": "keep",
            run / "tensorboard" / "README": "keep", run / "analysis.ipynb": "keep"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_text("old events")
    run_cli_here(capsys, "train", str(config), "--overwrite", "--no-progress")
    assert all(path.read_text() == "keep" for path in mine)
    assert not (run / "tensorboard" / "events.out.tfevents.1.host").exists()
    assert [row["step"] for row in train_rows(run / "metrics.jsonl")] == [1, 2]


def test_a_folder_with_somebody_elses_metrics_file_is_left_alone(prepared_data, tmp_path, capsys):
    config = _config(prepared_data, tmp_path, max_steps=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "accuracy": 0.5}\n')
    completed = run_cli_here(capsys, "train", str(config), "--no-progress", check=False)
    assert completed.returncode == 2 and "holds a metrics.jsonl but no polycom_lm run" in completed.stderr
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1, "accuracy": 0.5}\n'
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
