"""`scripts/gpu_session.sh` (the prepared GPU session) runs its `commands` stage start to finish in its
CPU smoke mode: GPU windows are short, so the script must not fail on its first real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polycom_lm.train.callbacks.metrics_file import read_metrics

REPOSITORY = Path(__file__).resolve().parents[1]
EVAL_DATA = REPOSITORY.parent / "shared" / "data" / "eval"


def _train_losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run / "metrics.jsonl") if row["kind"] == "train"}


@pytest.mark.slow
def test_gpu_session_commands_stage_runs_in_smoke_mode(tmp_path, prepared_data):
    # The tests' small prepared corpus instead of the built-in one (tokenising that first costs a minute).
    data = (f'data.train=[{{"source":"{prepared_data["train"]}"}}] '
            f'data.validation=[{{"name":"heldout","source":"{prepared_data["validation"]}"}}] model.vocab_size=512')
    environment = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "EXTRA_OVERRIDES": data,
                   "EVAL_DIR": str(EVAL_DATA if EVAL_DATA.is_dir() else tmp_path / "no-eval-data")}
    completed = subprocess.run(["bash", "scripts/gpu_session.sh", str(tmp_path / "out"), "commands"], cwd=REPOSITORY,
                               env=environment, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "commands.log").read_text()
    assert completed.returncode == 0, completed.stdout[-2000:] + log[-4000:]
    summary = json.loads((tmp_path / "out" / "commands.json").read_text())
    assert set(summary) == {"dense", "moe", "fsdp"}
    assert summary["dense"]["step"] == 6  # 4 steps, then the resume's 2 more
    # One-process FSDP takes the plain run's steps (bf16 autocast both).
    dense, fsdp = _train_losses(tmp_path / "out" / "runs" / "dense"), _train_losses(tmp_path / "out" / "runs" / "fsdp")
    assert fsdp == pytest.approx({step: dense[step] for step in fsdp}, rel=1e-3)
    assert "transformers generate:" in log
    if EVAL_DATA.is_dir():
        results = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]
        assert set(results) == {"piqa", "arc_easy"}
