"""`scripts/bench_gpu.py` runs start to finish (tiny shapes, any device) and writes every section's
figures: GPU time is scarce, so the one-command benchmark must not fail on its first real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_smoke_run_writes_every_section(tmp_path):
    output = tmp_path / "gpu.json"
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "scripts" / "bench_gpu.py"), "--smoke", "--no-compile",
         "--activations", "polynorm", "--json", str(output)],
        cwd=REPOSITORY, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["machine"]["copy_bytes_per_s"] > 0 and results["machine"]["bf16_matmul_flops"] > 0
    kernels = {(row["activation"], row["variant"]) for row in results["kernels"]}
    assert {("polynorm", "ours (fused)"), ("polyrelu", "ours (fused)"), ("polynorm", "seed (eager + checkpoint)")} <= kernels
    assert all(row["dx_relative_difference_to_ours"] < 2e-2 for row in results["kernels"])
    assert [row["variant"] for row in results["dense"]] == [
        "ours polynorm trainer step", "ours polynorm trainer step, fused CE", "transformers Llama (plain loop)"
    ]
    assert len(results["moe"]) == 5 and all(row["tokens_per_s"] > 0 for row in results["moe"])
    loss = {row["variant"]: row for row in results["loss"]}
    assert set(loss) == {"logits", "fused"}
    assert loss["fused"]["loss"] == pytest.approx(loss["logits"]["loss"], rel=1e-2)  # bf16 logits
    # The logits path keeps the [tokens, vocab] float32 log-probabilities for backward; the fused path keeps
    # only the input's gradient [tokens, d] and the weight's [vocab, d] (float32). Smoke: 64 tokens, d 64.
    tokens, dim, vocab = 2 * 32, 64, 256
    assert loss["logits"]["kept_for_backward_bytes"] >= tokens * vocab * 4
    assert loss["fused"]["kept_for_backward_bytes"] == (tokens * dim + vocab * dim) * 4
