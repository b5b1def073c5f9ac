"""lm-evaluation-harness itself (Python API, offline, `hf` model with trust_remote_code, the harness's own
task files) on a tiny exported PolyNorm model and the same rows: the same accuracies as `polycom-lm eval`
and the same log-likelihood for every request."""

from __future__ import annotations

import pytest

from eval_helpers import ALL_TASKS
from polycom_lm.eval import get_task
from polycom_lm.eval.harness import run_harness
from polycom_lm.eval.runner import evaluate
from polycom_lm.pretrained.loading import load_model

pytest.importorskip("lm_eval")


def test_lm_eval_on_the_exported_model_agrees_with_polycom_eval(tiny_export, eval_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    rows = {get_task(name): get_task(name).rows(eval_data)[:5] for name in ALL_TASKS}
    loaded = load_model(tiny_export)
    ours = evaluate(loaded.model, loaded.tokenizer, {task: [task.build(row) for row in task_rows] for task, task_rows in rows.items()},
                    max_length=loaded.model_config.max_seq_len, batch_size=4, keep_samples=True)
    theirs = run_harness(tiny_export, rows, tmp_path / "harness_tasks", batch_size=4)
    for result in ours.results:
        harness = theirs[result.task]
        assert set(harness["metrics"]) == set(result.metrics), result.task
        for metric, value in result.metrics.items():
            if metric == "perplexity":
                assert harness["metrics"][metric] == pytest.approx(value, rel=1e-4)
            else:
                assert harness["metrics"][metric] == value, (result.task, metric)
        for sample, harness_lls in zip(result.samples, harness["loglikelihoods"], strict=True):
            assert sample["loglikelihoods"] == pytest.approx(harness_lls, abs=1e-4), result.task
