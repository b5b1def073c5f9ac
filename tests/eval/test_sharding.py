"""Examples sharded over 2 gloo ranks give one process's metrics: `polycom-lm eval` under torchrun, and the
lockstep path of sharded engines (every rank runs the same number of forwards)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from eval_helpers import ALL_TASKS, sharded_evaluation_worker
from polycom_lm.eval import get_task
from polycom_lm.eval.runner import evaluate
from polycom_lm.pretrained.loading import load_model
from trainer_test_helpers import REPO, cli_environment

pytestmark = pytest.mark.slow


def assert_same_metrics(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for task, metrics in first.items():
        for key, value in metrics.items():
            if key.startswith("acc") or key == "examples":
                assert second[task][key] == value, (task, key)  # counts: exactly equal
            else:
                assert second[task][key] == pytest.approx(value, rel=1e-5), (task, key)


def test_eval_under_torchrun_with_two_processes_equals_one_process(tiny_run, eval_data, tmp_path):
    arguments = ["eval", str(tiny_run), "--tasks", ",".join(ALL_TASKS), "--data-dir", str(eval_data), "--limit", "5",
                 "--batch-size", "3", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "polycom_lm.cli", *arguments, "--out", str(tmp_path / "one.json")],
                   cwd=REPO, env=cli_environment(), check=True, capture_output=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "polycom_lm.cli", *arguments, "--out", str(tmp_path / "two.json")],
                         cwd=REPO, env=cli_environment(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("hellaswag") == 1  # only rank 0 prints
    one, both = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert both["world_size"] == 2
    assert_same_metrics(one["results"], both["results"])


def test_lockstep_scoring_on_two_ranks_runs_equal_forwards_and_equals_one_process(tiny_run, eval_data, tmp_path):
    mp.spawn(sharded_evaluation_worker,
             args=(2, str(tmp_path / "init"), str(tiny_run), str(eval_data), str(tmp_path / "rank{rank}.pt")),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0
    loaded = load_model(tiny_run)
    tasks = {get_task(name): get_task(name).examples(eval_data, 5) for name in ALL_TASKS}
    tasks = {task: examples[: 3 + ALL_TASKS.index(task.name) % 3] for task, examples in tasks.items()}
    single = {r.task: {"examples": r.examples, **r.metrics}
              for r in evaluate(loaded.model, loaded.tokenizer, tasks, max_length=256).results}
    for rank in ranks:
        for mode in ("replicated", "lockstep"):
            assert_same_metrics(single, {task: {"examples": count, **metrics} for task, count, metrics in rank[mode]})
