"""Running a study: each run is `polycom-lm train <its config>` in a subprocess, one after another or
`jobs` at a time (local runs on a CPU machine: each gets its share of the cores through OMP_NUM_THREADS).

Restartable by construction: a run whose latest checkpoint is at its last step is skipped, an interrupted
one is started again with the same config and resumes from its latest checkpoint (the trainer does that
by itself), a new one starts. Launchers:

- `local`: `python -m polycom_lm.cli train CONFIG`;
- `torchrun`: `python -m torch.distributed.run --standalone --nproc-per-node N -m polycom_lm.cli train CONFIG`;
- `slurm`: see `slurm.py` (a job array whose tasks call back into this runner for one run each).

With `select_lr`, the sweep runs go first, then the selection (`lr_selection.py`), then the main runs with
the chosen learning rates. Library code: it reports progress through `on_event` (the CLI prints it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from polycom_lm.checkpoint.folders import latest_checkpoint, write_text_atomically
from polycom_lm.errors import ConfigError, PolycomError
from polycom_lm.study import lr_selection
from polycom_lm.study.grid import LR_SWEEP, MAIN, PlannedRun, lr_values, main_runs, sweep_runs
from polycom_lm.study.spec import StudySpec
from polycom_lm.train.output import CONFIG_FILE, config_differences, read_saved_config
from polycom_lm.train.trainer_state import read_trainer_state

LAUNCHERS = ("local", "torchrun", "slurm")
STUDY_FILE = "study.json"
TIMINGS_FILE = "timings.jsonl"
DONE, PARTIAL, NEW = "finished", "interrupted", "not started"


class RunFailed(PolycomError):
    """A run of the study exited with an error (its log names the cause)."""


class RunStopped(PolycomError):
    """A stop signal reached the study (preemption, a time limit): it was forwarded to the run in training,
    which saved a checkpoint; `exit_status` is the run's (128 + the signal's number)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


# Forwarded to the run in training, which saves and stops (train/stop.py); the study then stops too.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class RunStatus:
    state: str  # DONE, PARTIAL or NEW
    step: int  # the latest checkpoint's step (0 when none)


def run_status(run: PlannedRun) -> RunStatus:
    """Where `run` stands, from its folder: its latest checkpoint's step against `training.max_steps`."""
    latest = latest_checkpoint(run.output_dir / "checkpoints")
    if latest is None:
        started = (run.output_dir / CONFIG_FILE).exists()
        return RunStatus(PARTIAL if started else NEW, 0)
    step = read_trainer_state(latest).step
    return RunStatus(DONE if step >= run.config.training.max_steps else PARTIAL, step)


def check_run_folder(run: PlannedRun) -> None:
    """A run folder holding a run of another config is refused before anything starts (the study file
    changed since that run began): nothing a user made is continued with a different recipe silently."""
    saved_path = run.output_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    differences = config_differences(read_saved_config(saved_path), run.config)
    if differences:
        shown = ", ".join(differences[:4]) + (f" and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ConfigError(
            f"{run.output_dir} holds run {run.name} with a different config (differs in {shown}): the study "
            f"changed since it ran; use another output_dir for the changed study, or move that run folder away"
        )


def train_command(run: PlannedRun, launcher: str, nproc_per_node: int) -> list[str]:
    train = ["-m", "polycom_lm.cli", "train", str(run.config_path), "--no-progress"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
                *torchrun_lifecycle_arguments(), *train]
    return [sys.executable, *train]


def torchrun_lifecycle_arguments() -> list[str]:
    """What launch/common.sh gives torchrun: restarts after a lost worker, and the stop signals forwarded
    to the workers with time to save (where this torch's torchrun has the options)."""
    from torch.distributed.run import get_args_parser

    options = {option for action in get_args_parser()._actions for option in action.option_strings}
    arguments = [f"--max-restarts={os.environ.get('MAX_RESTARTS', '3')}"]
    if "--signals-to-handle" in options and "--shutdown-timeout" in options:
        arguments += ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2",
                      f"--shutdown-timeout={os.environ.get('SHUTDOWN_TIMEOUT', '300')}"]
    return arguments


def train_environment(jobs: int = 1) -> dict[str, str]:
    """The runs' environment: this one, unbuffered, with a fresh store per torchrun attempt (launch/common.sh
    says why) and, with `jobs` runs at once, the CPU's threads shared between them, unless the user chose."""
    chosen = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if jobs > 1:
        chosen["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return {**chosen, **os.environ, "PYTHONUNBUFFERED": "1"}


def write_study_file(spec: StudySpec, runs: list[PlannedRun], selection: Optional[dict]) -> Path:
    """`study.json`: the study's grid and every run with its resolved config (what `compare` reads)."""
    record = {
        "name": spec.name,
        "study_file": str(spec.path),
        "base": str(spec.base),
        "grid": spec.grid,
        "axis_keys": spec.axis_keys,
        "variant_keys": spec.variant_keys,
        "ladder": spec.ladder.to_json() if spec.ladder else None,
        "overrides": spec.overrides,
        "per_value": spec.per_value,
        "select_lr": spec.lr_sweep is not None,
        "lr_selection": selection,
        "runs": [run.to_json() for run in runs],
    }
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    path = spec.output_dir / STUDY_FILE
    write_text_atomically(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def _write_config(run: PlannedRun) -> None:
    run.config_path.parent.mkdir(parents=True, exist_ok=True)
    text = run.config.to_yaml()
    if not run.config_path.is_file() or run.config_path.read_text(encoding="utf-8") != text:
        write_text_atomically(run.config_path, text)


def _record_timing(spec: StudySpec, run: PlannedRun, seconds: float, exit_code: int, start_step: int, launcher: str) -> None:
    row = {
        "run": run.name, "phase": run.phase, "seconds": round(seconds, 3), "exit_code": exit_code,
        "start_step": start_step, "launcher": launcher, "host": socket.gethostname(), "cpus": os.cpu_count(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(spec.output_dir / TIMINGS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def execute(spec: StudySpec, runs: list[PlannedRun], launcher: str, nproc_per_node: int,
            on_event: Callable[[str], None], jobs: int = 1) -> None:
    """Train every run that is not finished, in order, `jobs` at a time; a failed run stops the study
    (`RunFailed`, once the runs in flight have ended), a stop signal stops every run in flight (`RunStopped`)."""
    for run in runs:
        check_run_folder(run)
    logs = spec.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with _Trainings(spec, launcher, nproc_per_node, jobs, logs, on_event) as trainings:
        for index, run in enumerate(runs, start=1):
            status = run_status(run)
            where = f"[{index}/{len(runs)}] {run.phase} run {run.name}"
            if status.state == DONE:
                on_event(f"{where}: finished at step {status.step}, skipped")
                continue
            if not trainings.start(run, where, status):
                break
    trainings.raise_if_stopped()


def _spawn(command: list[str], log, environment: dict) -> subprocess.Popen:
    """A run's training process, its output into `log` (tests put one in their own process instead)."""
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)


@dataclass
class _Training:
    run: PlannedRun
    where: str
    log: Path
    handle: object
    process: subprocess.Popen
    start_step: int
    started: float


class _Trainings:
    """The runs in flight (at most `jobs`), each `polycom-lm train` in a subprocess with its log. The stop
    signals are forwarded to every one of them while the study runs; after a signal or a failure no run
    starts, and leaving the `with` block waits for those in flight."""

    def __init__(self, spec: StudySpec, launcher: str, nproc_per_node: int, jobs: int, logs: Path,
                 on_event: Callable[[str], None]):
        self.spec, self.launcher, self.nproc, self.jobs, self.logs = spec, launcher, nproc_per_node, jobs, logs
        self.on_event = on_event
        self.environment = train_environment(jobs)
        self.running: list[_Training] = []
        self.received: list[int] = []
        self.stopped: list[tuple[_Training, int, float]] = []
        self.failure: Optional[RunFailed] = None

    def __enter__(self) -> "_Trainings":
        self._previous = {number: signal.signal(number, self._forward) for number in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.running:
                self._wait_for_one()
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)

    def _forward(self, number: int, frame) -> None:
        self.received.append(number)
        for training in self.running:
            training.process.send_signal(number)

    def start(self, run: PlannedRun, where: str, status: RunStatus) -> bool:
        """Start `run` once a slot is free; False (nothing started) after a stop signal or a failed run."""
        while len(self.running) >= self.jobs and not self._halted():
            self._wait_for_one()
        if self._halted():
            return False
        _write_config(run)
        log = self.logs / f"{run.name}.log"
        verb = f"resuming at step {status.step}" if status.step else "starting"
        self.on_event(f"{where}: {verb} ({run.config.training.max_steps} steps; log {log})")
        command = train_command(run, self.launcher, self.nproc)
        handle = open(log, "a", encoding="utf-8")
        handle.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
        handle.flush()
        process = _spawn(command, handle, self.environment)
        self.running.append(_Training(run, where, log, handle, process, status.step, time.perf_counter()))
        return True

    def _halted(self) -> bool:
        return bool(self.received) or self.failure is not None

    def _wait_for_one(self) -> None:
        while True:
            done = [training for training in self.running if training.process.poll() is not None]
            if done:
                break
            time.sleep(0.2 if self.jobs > 1 else 0.05)
        for training in done:
            self.running.remove(training)
            self._finished(training)

    def _finished(self, training: _Training) -> None:
        run, code = training.run, training.process.returncode
        training.handle.close()
        seconds = time.perf_counter() - training.started
        _record_timing(self.spec, run, seconds, code, training.start_step, self.launcher)
        if self.received:
            self.stopped.append((training, code, seconds))
        elif code != 0:
            self.failure = self.failure or RunFailed(
                f"{run.phase} run {run.name} failed (exit status {code}) after {seconds:.0f} s; its log: "
                f"{training.log}; run the same study command again to resume it")
        else:
            self.on_event(f"{training.where}: done in {seconds:.0f} s")
            if self.spec.analyze and run.phase == MAIN:
                _analyze(run, self.logs, self.on_event)

    def raise_if_stopped(self) -> None:
        if self.received:
            name = signal.Signals(self.received[0]).name
            if not self.stopped:
                raise RunStopped(f"{name} stopped the study between runs; run the same study command again to "
                                 f"continue it", 128 + self.received[0])
            training, code, seconds = self.stopped[0]
            others = f" (and {len(self.stopped) - 1} more run(s) in flight)" if len(self.stopped) > 1 else ""
            raise RunStopped(
                f"{name} stopped {training.run.phase} run {training.run.name}{others} after {seconds:.0f} s (exit "
                f"status {code}; its log: {training.log}); run the same study command again to continue it",
                code or 128 + self.received[0])
        if self.failure is not None:
            raise self.failure


def _analyze(run: PlannedRun, logs: Path, on_event: Callable[[str], None]) -> None:
    command = [sys.executable, "-m", "polycom_lm.cli", "analyze", str(run.output_dir)]
    with open(logs / f"{run.name}.analyze.log", "a", encoding="utf-8") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise RunFailed(f"analyze {run.output_dir} failed (exit status {code}); see {logs / f'{run.name}.analyze.log'}")
    on_event(f"analysed {run.name} ({run.output_dir / 'analysis'})")


def _selection_for(spec: StudySpec, sweep: list[PlannedRun]) -> Optional[dict]:
    """The kept LR selection when it matches this sweep (same variants and candidates), else a fresh one
    when every sweep run has finished, else None."""
    kept = lr_selection.read_selection(spec.output_dir)
    expected = {(run.variant, run.name) for run in sweep}
    if kept is not None and {tuple(item) for item in kept.get("runs", [])} == expected:
        return kept
    if all(run_status(run).state == DONE for run in sweep):
        return lr_selection.select(spec, sweep)
    return None


def plan(spec: StudySpec, world_size: int = 1) -> tuple[list[PlannedRun], list[PlannedRun], Optional[dict]]:
    """(sweep runs, main runs, LR selection or None): main runs carry the chosen learning rates once the
    sweep has finished, else (under select_lr) they are marked `lr_pending`."""
    sweep = sweep_runs(spec, world_size)
    selection = _selection_for(spec, sweep) if sweep else None
    chosen = lr_selection.chosen_learning_rates(selection) if selection else None
    return sweep, main_runs(spec, chosen, world_size), selection


def run_study(spec: StudySpec, launcher: str = "local", nproc_per_node: Optional[int] = None,
              only: Optional[str] = None, on_event: Callable[[str], None] = lambda message: None,
              jobs: int = 1) -> list[PlannedRun]:
    """Run the study (or only the run named `only`, as a SLURM array task does), `jobs` runs at a time;
    returns the main runs run."""
    if launcher not in ("local", "torchrun"):
        raise ConfigError(f"launcher {launcher!r} runs nothing itself; choose local or torchrun")
    if jobs < 1 or (jobs > 1 and launcher != "local"):
        raise ConfigError(f"--jobs {jobs}: use 1 or more runs at once, and more than 1 only with --launcher local "
                          f"(torchrun runs use every device of the node)")
    nproc = nproc_per_node or (spec.nproc_per_node if launcher == "torchrun" else 1)
    world_size = nproc if launcher == "torchrun" else 1
    sweep, main, selection = plan(spec, world_size)
    all_sweep = sweep
    if only is not None:
        matches = [run for run in sweep + main if only in (run.name, f"{run.phase}/{run.name}")]
        if not matches:
            names = ", ".join(f"{run.phase}/{run.name}" for run in sweep + main)
            raise ConfigError(f"no run {only!r} in study {spec.name}; its runs: {names}")
        sweep = [run for run in matches if run.phase == LR_SWEEP]
        main = [run for run in matches if run.phase == MAIN]
    if sweep:
        on_event(f"LR sweep: {len(sweep)} run(s) over {spec.lr_sweep.key} in "
                 f"{', '.join(str(v) for v in lr_values(spec, world_size))}")
        execute(spec, sweep, launcher, nproc, on_event, jobs)
    if not main:
        return []
    if spec.lr_sweep is not None:
        selection = _selection_for(spec, all_sweep)
        if selection is None:
            unfinished = [run.name for run in all_sweep if run_status(run).state != DONE]
            raise ConfigError(
                f"study {spec.name}: the LR sweep has not finished ({len(unfinished)} run(s) left, e.g. "
                f"{unfinished[0]}); run the sweep first (the SLURM script's main array waits for it)"
            )
        lr_selection.write_selection(spec.output_dir, selection)
        for variant, entry in selection["variants"].items():
            edge = " (at the edge of the swept values: the optimum may lie outside them)" if entry["at_edge"] else ""
            on_event(f"LR selection: {variant}: {spec.lr_sweep.key} = {entry['best']}{edge}")
        chosen = lr_selection.chosen_learning_rates(selection)
        names = {run.name for run in main}
        main = [run for run in main_runs(spec, chosen, world_size) if run.name in names]
    record = main if only is None else plan(spec, world_size)[1]
    write_study_file(spec, record, selection)
    execute(spec, main, launcher, nproc, on_event, jobs)
    return main
