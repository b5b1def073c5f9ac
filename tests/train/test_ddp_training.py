"""`polycom-lm train` under torchrun with the ddp engine (2 processes on gloo) against one process: same
losses, gradient norms and validation loss; checkpoints move between world sizes (2 → 1 and 1 → 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from polycom_lm.train import run_training
from polycom_lm.train.callbacks.metrics_file import read_metrics
from trainer_test_helpers import REPO, cli_environment, load, run_config, train_rows, write_config

pytestmark = pytest.mark.slow


def _torchrun(config_path, *arguments: str) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "polycom_lm.cli", "train", str(config_path), "--no-progress", *arguments],
        cwd=REPO, env=cli_environment(), capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 0, process.stderr[-4000:]


def _numbers(metrics_path, steps=None):
    rows = train_rows(metrics_path)
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in rows if steps is None or row["step"] in steps}


def _evaluation(metrics_path):
    return {row["step"]: row["loss"] for row in read_metrics(metrics_path) if row["kind"] == "eval"}


def test_ddp_two_ranks_match_one_process_and_checkpoints_reshard(prepared_data, tmp_path):
    # 8 sequences per step: one process runs 4 micro-batches of 2, each of two ranks runs 2 of 2.
    def raw(name, **training):
        return run_config(prepared_data, tmp_path / name, max_steps=4, global_batch_size=8, micro_batch_size=2,
                          save_every_steps=2, eval_every_steps=2, **training)

    single = run_training(load(raw("single")))
    _torchrun(write_config(tmp_path / "ddp.yaml", raw("ddp")))

    expected = _numbers(single.metrics_path)
    distributed = _numbers(tmp_path / "ddp" / "metrics.jsonl")
    assert sorted(distributed) == [1, 2, 3, 4]
    for step, (loss, grad_norm) in expected.items():
        assert distributed[step][0] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert distributed[step][1] == pytest.approx(grad_norm, rel=1e-4, abs=1e-6)
    ddp_evaluation = _evaluation(tmp_path / "ddp" / "metrics.jsonl")
    for step, loss in _evaluation(single.metrics_path).items():
        assert ddp_evaluation[step] == pytest.approx(loss, rel=1e-5)
    state = (tmp_path / "ddp" / "checkpoints" / "step_2" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state and (tmp_path / "ddp" / "checkpoints" / "step_2" / "rng" / "rank_1.pt").is_file()

    # 2 → 1: one process continues the two-rank run from its step-2 checkpoint.
    from_two = run_training(load(raw("from_two")), resume=str(tmp_path / "ddp" / "checkpoints" / "step_2"))
    continued = _numbers(from_two.metrics_path)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step][0] == pytest.approx(distributed[step][0], rel=1e-5, abs=1e-6)

    # 1 → 2: two ranks continue the single-process run from its step-2 checkpoint.
    _torchrun(write_config(tmp_path / "from_one.yaml", raw("from_one")),
              "--resume", str(tmp_path / "single" / "checkpoints" / "step_2"))
    continued = _numbers(tmp_path / "from_one" / "metrics.jsonl")
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step][0] == pytest.approx(expected[step][0], rel=1e-5, abs=1e-6)
