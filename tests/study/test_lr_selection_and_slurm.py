"""Choosing each variant's learning rate from the sweep's validation losses, and the SLURM job arrays."""

from __future__ import annotations

import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polycom_lm.errors import ConfigError
from polycom_lm.study import lr_selection, slurm
from polycom_lm.study.grid import main_runs, sweep_runs
from polycom_lm.study.spec import load_study
from study_helpers import write_metrics, write_study


def _finish(run, losses: dict[str, float]) -> None:
    rows = [{"kind": "train", "step": 1, "tokens": 256, "loss": 5.0}]
    rows += [{"kind": "eval", "step": 1, "tokens": 256, "name": name, "loss": loss, "perplexity": math.exp(min(loss, 50))}
             for name, loss in losses.items()]
    write_metrics(run.output_dir, rows)


def test_each_variant_gets_the_lr_with_the_lowest_validation_loss(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["relu", "polynorm"]}, select_lr=True,
                       lr_sweep={"values": [1e-3, 3e-3, 1e-2], "validation_set": "heldout"})
    spec = load_study(path)
    runs = sweep_runs(spec)
    losses = {  # relu: best in the middle; polynorm: the largest diverged, best at the low edge
        "activation-relu": [4.1, 3.9, 4.4],
        "activation-polynorm": [3.7, 3.8, float("nan")],
    }
    for run in runs:
        index = [1e-3, 3e-3, 1e-2].index(run.grid["optimizer.lr"])
        _finish(run, {"other": 0.0, "heldout": losses[run.variant][index]})
    selection = lr_selection.select(spec, runs)
    relu, polynorm = selection["variants"]["activation-relu"], selection["variants"]["activation-polynorm"]
    assert (relu["best"], relu["at_edge"]) == (3e-3, False)
    assert (polynorm["best"], polynorm["at_edge"]) == (1e-3, True)
    assert math.isnan(polynorm["losses"]["0.01"])
    assert selection["validation_set"] == "heldout"
    chosen = main_runs(spec, lr_selection.chosen_learning_rates(selection))
    assert [run.config.optimizer.lr for run in chosen] == [3e-3, 1e-3]


def test_selection_errors_name_the_problem(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["relu"]}, select_lr=True,
                       lr_sweep={"values": [1e-3, 3e-3]})
    spec = load_study(path)
    runs = sweep_runs(spec)
    for run in runs:
        _finish(run, {"heldout": float("inf")})
    with pytest.raises(ConfigError, match="every LR sweep run of variant .* diverged"):
        lr_selection.select(spec, runs)
    write_metrics(runs[0].output_dir, [{"kind": "train", "step": 1, "tokens": 8, "loss": 5.0}])
    with pytest.raises(ConfigError, match="logged no validation loss; the LR sweep needs a validation set"):
        lr_selection.select(spec, runs)


def test_slurm_script_for_a_2x2_grid_has_one_array_task_per_run(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"], "training.seed": [0, 1]},
                       training={"micro_batch_size": 2},  # 8 sequences over 4 ranks
                       launcher={"nproc_per_node": 4, "slurm": {"partition": "gpu", "time": "02:00:00",
                                                                 "gpus_per_node": 4, "extra": ["--account=lm"]}})
    spec = load_study(path)
    scripts, command = slurm.write_scripts(spec, [], main_runs(spec, world_size=4), 4)
    assert [script.name for script in scripts] == ["main.sbatch"]
    text = scripts[0].read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --nodes=1", "#SBATCH --account=lm", "#SBATCH --job-name=toy-main"):
        assert line in text.splitlines(), line
    runs = [line.strip() for line in text.split("RUNS=(")[1].split(")")[0].splitlines() if line.strip()]
    assert runs == ["main/activation-swiglu_seed-0", "main/activation-swiglu_seed-1",
                    "main/activation-polynorm_seed-0", "main/activation-polynorm_seed-1"]
    assert f"study {path.resolve()} --only \"$RUN\" --launcher torchrun --nproc-per-node 4" in text
    assert command == f"sbatch {scripts[0]}"
    assert subprocess.run(["bash", "-n", str(scripts[0])]).returncode == 0
    # What task 2 runs: the script's array indexing, executed with the command replaced by an echo.
    body = text.replace(f"{shlex.quote(sys.executable)} -m polycom_lm.cli", "echo").replace("set -euo pipefail", "set -eu")
    task = subprocess.run(["bash", "-c", body], env={"SLURM_ARRAY_TASK_ID": "2", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True)
    assert "study " in task.stdout and "--only main/activation-polynorm_seed-0 " in task.stdout
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text


def test_slurm_array_task_forwards_usr1_to_the_study_and_requeues_itself(prepared_data, tmp_path):
    """The array script's signal path, with the study command replaced by a process that stops on USR1 as
    a training run does (exit 128 + 10) and scontrol by the tests' stand-in: USR1 to the script reaches
    the command, the task exits with its status and asks to requeue exactly this array task."""
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"]})
    spec = load_study(path)
    scripts, _ = slurm.write_scripts(spec, [], main_runs(spec), 1)
    stand_in = Path(__file__).resolve().parents[1] / "distributed" / "slurm_stand_in"
    started = tmp_path / "started"
    worker = f"bash -c 'trap \"exit 138\" USR1; touch {started}; while true; do sleep 0.05; done' --"
    body = scripts[0].read_text().replace(f"{shlex.quote(sys.executable)} -m polycom_lm.cli", worker)
    log = tmp_path / "scontrol.log"
    task = subprocess.Popen(["bash", "-c", body], env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77",
                                                        "SLURM_JOB_ID": "78", "SCONTROL_LOG": str(log),
                                                        "PATH": f"{stand_in}:/usr/bin:/bin"})
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and task.poll() is None
        time.sleep(0.02)
    task.send_signal(signal.SIGUSR1)
    assert task.wait(timeout=30) == 138
    assert log.read_text().split() == ["requeue", "77_1"]


def test_slurm_with_select_lr_chains_the_main_array_after_the_sweep(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"], "training.seed": [0, 1]},
                       select_lr=True, lr_sweep={"values": [1e-3, 3e-3]})
    spec = load_study(path)
    scripts, command = slurm.write_scripts(spec, sweep_runs(spec), main_runs(spec), 1)
    assert [script.name for script in scripts] == ["lr_sweep.sbatch", "main.sbatch"]
    assert "#SBATCH --array=0-3" in scripts[0].read_text() and "--launcher local" in scripts[0].read_text()
    assert command.startswith(f"jobid=$(sbatch --parsable {scripts[0]}) && sbatch --dependency=afterok:")
    assert command.endswith(str(scripts[1]))
