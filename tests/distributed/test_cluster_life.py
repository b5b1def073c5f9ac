"""Cluster life for real, with each "node" a torchrun process on 127.0.0.1 joined by c10d rendezvous through
`launch/torchrun_multi_node.sh` itself (gloo):

- DDP, FSDP and HSDP (replicated across the two nodes, sharded within each) reproduce the one-process run,
  losses and pre-clip gradient norms, at the equivalence tests' tolerances; the HSDP run writes its
  checkpoints asynchronously and one of them resumes on one process;
- `launch/slurm.sbatch` under stand-in `srun` / `scontrol` trains, is preempted with SLURM's SIGUSR1 (its
  `--signal=B:USR1@...`), saves, asks to be requeued, and the requeued job continues to the uninterrupted
  run's losses;
- a worker SIGKILLed: torchrun restarts the group, which resumes from `latest` by itself;
- a rank that stalls ends the run within the timeout with one line naming it; a rank whose data fails
  stops every rank with one line, its checkpoints intact.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from engine_harness import REPOSITORY

pytestmark = pytest.mark.slow

MAX_STEPS = 6
STAND_IN = Path(__file__).resolve().parent / "slurm_stand_in"


def _config(prepared_data, output_dir: Path, folder: Path, name: str) -> Path:
    raw = {
        "base": str(REPOSITORY / "configs" / "model" / "tiny.yaml"),
        "model": {"activation": "polynorm", "max_seq_len": 32, "d_model": 32, "ffn_hidden_size": 64},
        "data": {"train": [{"source": str(prepared_data["train"])}]},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "training": {"output_dir": str(output_dir), "max_steps": MAX_STEPS, "seq_len": 16, "global_batch_size": 8,
                     "micro_batch_size": 2, "log_every_steps": 1, "eval_every_steps": 0, "save_every_steps": 2,
                     "keep_last_checkpoints": 3, "seed": 3},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _numbers(run: Path) -> dict[int, tuple[float, float]]:
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    return {row["step"]: (row["loss"], row["grad_norm"]) for row in read_metrics(run / "metrics.jsonl") if row["kind"] == "train"}


def _assert_equivalent(measured: dict, expected: dict, steps=range(1, MAX_STEPS + 1)) -> None:
    assert sorted(measured) == list(steps), f"steps logged: {sorted(measured)}"
    for step in steps:
        assert measured[step][0] == pytest.approx(expected[step][0], rel=1e-5), f"step {step} loss"
        assert measured[step][1] == pytest.approx(expected[step][1], rel=1e-4), f"step {step} gradient norm"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "POLYCOM_LM_START_TIME")
    environment = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    environment.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPOSITORY))
    environment.update(extra)
    return environment


class Nodes:
    """`launch/torchrun_multi_node.sh CONFIG ARGUMENTS` started once per "node", each with its own log."""

    def __init__(self, config: Path, logs: Path, nodes: int, per_node: int, *arguments: str, **environment: str):
        port = str(_free_port())
        self.logs = [logs / f"node{node}.log" for node in range(nodes)]
        self.processes = []
        for node, log in enumerate(self.logs):
            extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NNODES=str(nodes), NODE_RANK=str(node),
                         NPROC_PER_NODE=str(per_node), RDZV_ID=f"test-{port}", **environment)
            with open(log, "w", encoding="utf-8") as handle:
                self.processes.append(subprocess.Popen(
                    ["bash", str(REPOSITORY / "launch" / "torchrun_multi_node.sh"), str(config), *arguments, "--no-progress"],
                    cwd=REPOSITORY, env=_environment(**extra), stdout=handle, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for other in self.processes:
                    other.kill()
                raise AssertionError(f"the nodes did not finish within {timeout} s:\n{self.output()[-4000:]}")
        return codes

    def output(self) -> str:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace") for log in self.logs)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def single(prepared_data, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """The one-process run every multi-process run here is compared with."""
    from polycom_lm.config import load_config
    from polycom_lm.train import run_training

    folder = tmp_path_factory.mktemp("single")
    run_training(load_config(_config(prepared_data, folder / "run", folder, "single")))
    return _numbers(folder / "run")


# ------------------------------------------------------------------------------------ multi-node runs


@pytest.mark.parametrize("layout, per_node, overrides", [
    ("ddp", 1, []),
    ("fsdp", 1, ["distributed.backend=fsdp"]),
    # 2 nodes x 2 ranks: replicas across the nodes, shards within each; checkpoints written asynchronously.
    ("hsdp", 2, ["distributed.backend=fsdp", "distributed.fsdp_replicate=2", "training.async_checkpoint=true"]),
], ids=["ddp", "fsdp", "hsdp"])
def test_two_nodes_reproduce_the_one_process_run(prepared_data, tmp_path, single, layout, per_node, overrides):
    run = tmp_path / layout
    nodes = Nodes(_config(prepared_data, run, tmp_path, layout), tmp_path, 2, per_node, *overrides)
    assert nodes.wait() == [0, 0], nodes.output()[-6000:]
    _assert_equivalent(_numbers(run), single)
    if layout == "hsdp":  # an asynchronous 4-rank checkpoint resumes on one process
        from polycom_lm.config import load_config
        from polycom_lm.train import run_training

        assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"
        continued = run_training(load_config(_config(prepared_data, tmp_path / "resumed", tmp_path, "resumed")),
                                 resume=str(run / "checkpoints" / "step_4"))
        _assert_equivalent(_numbers(continued.output_dir), single, steps=range(5, MAX_STEPS + 1))


def test_slurm_job_trains_is_preempted_by_usr1_requeued_and_the_requeued_job_continues(prepared_data, tmp_path, single):
    """`launch/slurm.sbatch` on a 2-node stand-in allocation: SLURM's USR1 (as `--signal=B:USR1@300` sends it
    to the batch script) reaches every worker through srun and torchrun; they save one checkpoint and
    stop; the script requeues the job; the requeued job (started as SLURM would, with SLURM_RESTART_COUNT=1)
    resumes from `latest` with no flag and ends with the uninterrupted run's losses."""
    run = tmp_path / "slurm"
    config = _config(prepared_data, run, tmp_path, "slurm")
    # Slow the steps down (a 0.3 s stall in each on rank 0) so that the signal lands mid-run.
    requeues = tmp_path / "scontrol.log"
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPOSITORY),
                 NPROC_PER_NODE="1", MASTER_PORT=str(_free_port()), SCONTROL_LOG=str(requeues),
                 PATH=f"{STAND_IN}:{os.environ['PATH']}")

    def job(log: Path, **extra: str) -> subprocess.Popen:
        with open(log, "w", encoding="utf-8") as handle:
            return subprocess.Popen(["bash", str(REPOSITORY / "launch" / "slurm.sbatch"), str(config), "--no-progress"],
                                    cwd=REPOSITORY, env=_environment(**slurm, **extra), stdout=handle, stderr=subprocess.STDOUT)

    first = job(tmp_path / "job1.log", POLYCOM_LM_FAULT="sleep:0:3:2")
    deadline = time.monotonic() + 240
    while "POLYCOM_LM_FAULT: sleep at step 3" not in (tmp_path / "job1.log").read_text() and first.poll() is None:
        assert time.monotonic() < deadline, "the job never reached step 3"
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    first.wait(timeout=240)
    log = (tmp_path / "job1.log").read_text()
    assert requeues.read_text().split() == ["requeue", "4242"], log[-4000:]
    stopped = (run / "checkpoints" / "latest").read_text().strip()
    assert stopped == "step_3", log[-4000:]  # every rank stopped after the step the signal came in
    assert "stopped after step 3 (SIGUSR1)" in log

    second = job(tmp_path / "job2.log", SLURM_RESTART_COUNT="1")
    assert second.wait(timeout=240) == 0, (tmp_path / "job2.log").read_text()[-4000:]
    assert requeues.read_text().split() == ["requeue", "4242"]  # not requeued again
    _assert_equivalent(_numbers(run), single)


@pytest.mark.parametrize("nodes, killed", [(2, 0), (1, 1)])
def test_a_killed_worker_restarts_the_group_which_resumes_from_latest(prepared_data, tmp_path, single, nodes, killed):
    """A rank SIGKILLs itself as step 5 starts (checkpoint step_4 is complete; only in the process that
    started the run). Rank 0, whose process hosts the workers' store, on two "nodes" of one worker each
    (`launch/torchrun_multi_node.sh`, c10d rendezvous); rank 1 on one node of two workers
    (`launch/torchrun_single_node.sh`; rank 1 on two nodes passed 12 of 12 times as well). torchrun
    restarts the group once and the new workers resume from `latest` by themselves. Exactly once: with the
    rendezvous store shared across attempts (torchrun's default, which the launchers turn off), the new
    group read the dead workers' addresses and failed to connect, using up a further restart, in 3 of 4
    runs here."""
    run = tmp_path / "restarted"
    config = _config(prepared_data, run, tmp_path, "restarted")
    fault = dict(POLYCOM_LM_FAULT=f"kill:{killed}:5", MAX_RESTARTS="2")
    if nodes == 2:
        group = Nodes(config, tmp_path, 2, 1, "training.stop_grace_seconds=2", **fault)
        assert group.wait(timeout=240) == [0, 0], group.output()[-6000:]
        output = group.output()
    else:
        log = tmp_path / "node.log"
        with open(log, "w", encoding="utf-8") as handle:
            process = subprocess.Popen(
                ["bash", str(REPOSITORY / "launch" / "torchrun_single_node.sh"), str(config), "--no-progress",
                 "training.stop_grace_seconds=2"], cwd=REPOSITORY, stdout=handle, stderr=subprocess.STDOUT,
                env=_environment(NPROC_PER_NODE="2", **fault))
            assert process.wait(timeout=240) == 0, log.read_text()[-6000:]
        output = log.read_text()
    assert f"kill at step 5 on rank {killed}" in output
    survivor = 1 - killed
    assert f"error: rank {survivor}: a collective in 'token count all-reduce' of step 5 failed" in output
    assert output.count("initialised gloo process group: rank 0 of 2") == 2, output[-6000:]  # one restart
    assert "resumed from" in output and "checkpoints/step_4 at step 4" in output
    assert "connectFullMesh failed" not in output
    _assert_equivalent(_numbers(run), single)  # one row per step, the uninterrupted numbers


def test_a_rank_that_stalls_ends_the_run_within_the_timeout_with_one_line_naming_it(prepared_data, tmp_path):
    run = tmp_path / "stalled"
    timeout_s = 3
    nodes = Nodes(_config(prepared_data, run, tmp_path, "stalled"), tmp_path, 2, 1, f"distributed.timeout_seconds={timeout_s}",
                  POLYCOM_LM_FAULT="sleep:1:3:120", MAX_RESTARTS="0")
    while "sleep at step 3 on rank 1" not in nodes.output():
        assert all(process.poll() is None for process in nodes.processes), nodes.output()[-4000:]
        time.sleep(0.05)
    stalled_at = time.monotonic()
    codes = nodes.wait(timeout=120)
    ended_after = time.monotonic() - stalled_at
    output = nodes.output()
    assert all(code != 0 for code in codes)
    errors = _error_lines(output)
    assert len(errors) == 1, output[-6000:]
    assert re.search(r"rank 1 did not arrive within distributed\.timeout \(3 s\): rank 1 has been in 'data' of step 3",
                     errors[0]), errors[0]
    assert "rank 0 waited in 'token count all-reduce' of step 3" in errors[0]
    assert "[rank0]:" not in output and "[rank1]:" not in output  # no worker traceback
    # The timeout, one watchdog interval and torchrun's shutdown; far from the 120 s stall.
    assert ended_after < timeout_s + 20, f"the run ended {ended_after:.1f} s after the stall began"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"


def test_a_rank_whose_data_fails_stops_every_rank_with_one_line(prepared_data, tmp_path):
    run = tmp_path / "failed"
    nodes = Nodes(_config(prepared_data, run, tmp_path, "failed"), tmp_path, 2, 1,
                  POLYCOM_LM_FAULT="fail:1:3", MAX_RESTARTS="0")
    codes = nodes.wait(timeout=180)
    output = nodes.output()
    assert all(code != 0 for code in codes)
    assert _error_lines(output) == ["error: POLYCOM_LM_FAULT: injected data failure at step 3"], output[-6000:]
    assert "[rank0]:" not in output and "[rank1]:" not in output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert (run / "checkpoints" / "step_2" / ".complete").is_file()
