"""DeepSpeed ZeRO 1/2/3 on 2 gloo processes reproduce the single-process losses (fp32 with gradient
accumulation to 1e-6, bf16 within bf16 tolerance), resume from their own checkpoints, and consolidate into
a safetensors model that the plain single-process model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from engine_harness import (  # noqa: E402
    assert_matches_reference,
    consolidate_and_compare,
    reference_numbers,
    run_worker,
    tiny_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    shared = tmp_path_factory.mktemp("deepspeed")
    output = shared / "results.json"
    run_worker(2, "deepspeed", output, str(shared), timeout_s=900)  # the first run compiles one small op
    measured = json.loads(output.read_text())
    measured["shared"] = str(shared)
    return measured


@pytest.fixture(scope="module")
def reference():
    return reference_numbers(tiny_config("polynorm"), steps=4)


def assert_losses_close(actual, expected, relative):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= relative * abs(e), f"step {step}: {a} vs single-process {e}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_fp32_with_accumulation_matches_single_process(results, reference, stage):
    assert_matches_reference(results[f"zero{stage}_fp32_accumulate"], reference, slice(0, 3), relative=1e-6)


def test_zero3_fused_cross_entropy_matches_single_process(results, reference):
    assert_matches_reference(results["zero3_fused_cross_entropy"], reference, slice(0, 3), relative=1e-6)


def test_zero2_bf16_matches_single_process_within_bf16_tolerance(results, reference):
    assert_matches_reference(results["zero2_bf16"], reference, slice(0, 3), relative=2e-2, norm_relative=5e-2)
    assert results["zero2_bf16"]["losses"] != pytest.approx(reference.losses[:3], rel=1e-7)  # bf16 really was on


def test_zero3_checkpoint_resumes_with_the_uninterrupted_losses(results, reference):
    assert_matches_reference(results["zero3_saved"], reference, slice(0, 2), relative=1e-6)
    assert_matches_reference(results["zero3_resumed"], reference, slice(2, 4), relative=1e-6)


def test_zero3_checkpoint_consolidates_into_a_loadable_single_process_model(results, tmp_path):
    consolidate_and_compare(Path(results["shared"]) / "zero3_step2", tmp_path, "polynorm")


def test_deepspeed_engine_runs_in_one_process_without_a_launcher(reference, tmp_path, monkeypatch):
    """World size 1 without torchrun: the engine makes its own process group and matches the reference. On
    a CPU it builds no C++ op: DeepSpeed's shared-memory all-reduce (inference only) took 34 s of g++ here."""
    from engine_harness import run_single_process_deepspeed

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # an empty build cache
    completed = run_single_process_deepspeed("print([engine_step(engine, fixed_batch(config), 2)[0] for _ in range(2)])\n")
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = json.loads(completed.stdout.strip().splitlines()[-1])
    assert_losses_close(losses, reference.losses[:2], relative=1e-6)
    assert "built successfully" not in completed.stdout and not (tmp_path / "extensions").exists()
