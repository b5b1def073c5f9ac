"""Studies run for real (subprocesses training the tiny model): a restart skips the finished run and
resumes the interrupted one; the LR sweep picks each variant's learning rate for the main runs; the
`study` command writes the report (with the analyses) when every run has finished."""

from __future__ import annotations

import json
import re

import pytest

from polycom_lm.faults import CRASH_ENVIRONMENT
from polycom_lm.cli import main as cli
from polycom_lm.study import runner
from polycom_lm.study.grid import main_runs
from polycom_lm.study.spec import load_study
from study_helpers import write_study
from trainer_test_helpers import train_rows

pytestmark = pytest.mark.slow


def _rows(run) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in train_rows(run.output_dir / "metrics.jsonl")]


def test_restart_skips_the_finished_run_and_resumes_the_interrupted_one(prepared_data, tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, prepared_data, {"training.seed": [1, 2]}, analyze=True,
                       training={"max_steps": 6, "save_every_steps": 2, "eval_every_steps": 3})
    spec = load_study(path)
    first, second = main_runs(spec)
    events: list[str] = []
    runner.run_study(spec, only="main/" + first.name, on_event=events.append)
    finished = (first.output_dir / "metrics.jsonl").read_bytes()
    assert runner.run_status(first) == runner.RunStatus(runner.DONE, 6)

    monkeypatch.setenv(CRASH_ENVIRONMENT, "complete:4")  # SIGKILL inside the step-4 save, once its files are complete
    with pytest.raises(runner.RunFailed, match=rf"main run {second.name} failed \(exit status -9\).*log: .*{second.name}.log"):
        runner.run_study(spec, only=second.name, on_event=events.append)
    monkeypatch.delenv(CRASH_ENVIRONMENT)
    assert runner.run_status(second).state == runner.PARTIAL

    assert cli(["study", str(path)]) == 0
    output = capsys.readouterr().out
    assert f"main run {first.name}: finished at step 6, skipped" in output
    assert f"main run {second.name}: resuming at step 4" in output
    assert (first.output_dir / "metrics.jsonl").read_bytes() == finished  # untouched
    assert [step for step, _ in _rows(second)] == [1, 2, 3, 4, 5, 6]  # no step lost or repeated
    log = (spec.output_dir / "logs" / f"{second.name}.log").read_text()
    assert "resumed from" in log and "at step 4" in log
    timings = [json.loads(line) for line in (spec.output_dir / "timings.jsonl").read_text().splitlines()]
    assert [(row["run"], row["exit_code"], row["start_step"]) for row in timings] == [
        (first.name, 0, 0), (second.name, -9, 0), (second.name, 0, 4)]
    for run in (first, second):
        analysis = json.loads((run.output_dir / "analysis" / "analysis.json").read_text())
        assert analysis["step"] == 6 and len(analysis["cosine_similarity"]["values"]) == 2
    report = (spec.output_dir / "report" / "report.md").read_text()
    assert "## The paper's analyses" in report and "![effective rank](effective_rank.png)" in report
    study = json.loads((spec.output_dir / "study.json").read_text())
    assert [run["name"] for run in study["runs"]] == [first.name, second.name]


def test_lr_sweep_chooses_the_learning_rate_of_the_main_runs(prepared_data, tmp_path, capsys, runner_trains_in_process):
    """The sweep's runs and the main run train in this process (the subprocesses are the other tests')."""
    path = write_study(tmp_path, prepared_data, {"model.activation": ["polynorm"], "training.seed": [3]},
                       select_lr=True, lr_sweep={"values": [1e-4, 3e-2], "overrides": {"training.max_steps": 3}},
                       training={"max_steps": 4, "eval_every_steps": 0})
    assert cli(["study", str(path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "lr chosen by the sweep" in dry and "not started" in dry
    spec = load_study(path)
    assert not spec.output_dir.exists()  # a dry run writes nothing
    assert cli(["study", str(path)]) == 0
    selection = json.loads((spec.output_dir / "lr_selection.json").read_text())
    losses = selection["variants"]["activation-polynorm"]["losses"]
    best = min(losses, key=losses.get)
    assert float(best) == selection["variants"]["activation-polynorm"]["best"]
    (run,) = main_runs(spec, {"activation-polynorm": float(best)})
    assert runner.run_status(run).state == runner.DONE
    saved = (run.output_dir / "config.yaml").read_text()
    assert f"lr: {float(best)}" in saved
    assert len(runner_trains_in_process) == 3  # 2 sweep runs, 1 main run
    report = (spec.output_dir / "report" / "report.md").read_text()
    assert "## Learning-rate selection (toy)" in report and "(edge of the sweep)" in report


def test_a_stop_signal_to_the_study_reaches_the_run_in_training_which_saves_and_the_study_exits_with_its_status(prepared_data, tmp_path):
    """SIGTERM to `polycom-lm study` (SLURM's preemption, forwarded by the array script) is forwarded to the
    `train` process, which saves after its step and exits 143; the study says so in one line and exits 143
    too, leaving the run resumable at that step (resuming is the restart test's above)."""
    import signal
    import subprocess
    import sys
    import time

    from trainer_test_helpers import REPO, cli_environment

    path = write_study(tmp_path, prepared_data, {"training.seed": [1]},
                       training={"max_steps": 200, "save_every_steps": 0, "eval_every_steps": 0})
    run = main_runs(load_study(path))[0]
    study = subprocess.Popen([sys.executable, "-m", "polycom_lm.cli", "study", str(path)], cwd=REPO, env=cli_environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run.output_dir / "metrics.jsonl").is_file() or '"step": 2,' not in (run.output_dir / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and study.poll() is None, "the run never reached step 2"
        time.sleep(0.02)
    study.send_signal(signal.SIGTERM)
    output, _ = study.communicate(timeout=120)
    assert study.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert f"stopped: SIGTERM stopped main run {run.name}" in output
    stopped = runner.run_status(run)
    assert stopped.state == runner.PARTIAL and 2 <= stopped.step < 200
    assert [step for step, _ in _rows(run)][-1] == stopped.step


def test_jobs_share_the_cores_and_need_the_local_launcher(prepared_data, tmp_path, monkeypatch):
    spec = load_study(write_study(tmp_path, prepared_data, {"training.seed": [1]}))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    assert runner.train_environment(2)["OMP_NUM_THREADS"] == "2"  # 4 cores shared by 2 runs
    assert "OMP_NUM_THREADS" not in runner.train_environment(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runner.train_environment(2)["OMP_NUM_THREADS"] == "3"  # the user's choice stands
    for launcher, jobs in (("torchrun", 2), ("local", 0)):
        with pytest.raises(runner.ConfigError, match=f"--jobs {jobs}: "):
            runner.run_study(spec, launcher=launcher, jobs=jobs)


def test_a_stop_signal_reaches_every_run_in_flight_under_jobs(prepared_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from trainer_test_helpers import REPO, cli_environment

    path = write_study(tmp_path, prepared_data, {"training.seed": [1, 2, 3]},
                       training={"max_steps": 300, "save_every_steps": 0, "eval_every_steps": 0})
    runs = main_runs(load_study(path))
    study = subprocess.Popen([sys.executable, "-m", "polycom_lm.cli", "study", str(path), "--jobs", "2"], cwd=REPO,
                             env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120

    def at_step_2(run) -> bool:
        metrics = run.output_dir / "metrics.jsonl"
        return metrics.is_file() and '"step": 2,' in metrics.read_text()

    while not (at_step_2(runs[0]) and at_step_2(runs[1])):
        assert time.monotonic() < deadline and study.poll() is None, "the two runs never reached step 2"
        time.sleep(0.02)
    study.send_signal(signal.SIGTERM)
    output, _ = study.communicate(timeout=120)
    assert study.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert re.search(rf"stopped: SIGTERM stopped main run ({runs[0].name}|{runs[1].name}) \(and 1 more run\(s\) in flight\)",
                     output), output[-3000:]
    for run in runs[:2]:  # both saved where they stopped, resumable
        stopped = runner.run_status(run)
        assert stopped.state == runner.PARTIAL and 2 <= stopped.step < 300
    assert runner.run_status(runs[2]).state == runner.NEW  # not started after the signal: never three at once
