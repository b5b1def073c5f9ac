"""DeepSpeed ZeRO 1/2/3 on 2 gloo processes reproduce the single-process losses (fp32 with gradient
accumulation to 1e-6, bf16 within bf16 tolerance), resume from their own checkpoints, and consolidate into
a safetensors model that the plain single-process model loads."""

from __future__ import annotations

import json
import os
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


def test_zero2_bf16_matches_single_process_within_bf16_tolerance(results, reference):
    assert_matches_reference(results["zero2_bf16"], reference, slice(0, 3), relative=2e-2, norm_relative=5e-2)
    assert results["zero2_bf16"]["losses"] != pytest.approx(reference.losses[:3], rel=1e-7)  # bf16 really was on


def test_zero3_checkpoint_resumes_with_the_uninterrupted_losses(results, reference):
    assert_matches_reference(results["zero3_saved"], reference, slice(0, 2), relative=1e-6)
    assert_matches_reference(results["zero3_resumed"], reference, slice(2, 4), relative=1e-6)


def test_zero3_checkpoint_consolidates_into_a_loadable_single_process_model(results, tmp_path):
    consolidate_and_compare(Path(results["shared"]) / "zero3_step2", tmp_path, "polynorm")


def test_deepspeed_engine_runs_in_one_process_without_a_launcher(reference):
    """World size 1 without torchrun: the engine makes its own process group and matches the reference."""
    import subprocess
    import sys

    from engine_harness import HERE, REPOSITORY

    script = (
        "import torch\n"
        "from engine_harness import build_optimizer, build_tiny_model, engine_step, fixed_batch, tiny_config\n"
        "from polycom_lm.distributed.parallelize import build_engine, parallelize\n"
        "config = tiny_config(backend='deepspeed', zero_stage=2)\n"
        "engine = build_engine(config, torch.device('cpu'))\n"
        "parallelize(build_tiny_model(config), config, engine, build_optimizer)\n"
        "print([engine_step(engine, fixed_batch(config), 2)[0] for _ in range(2)])\n"
        "engine.close()\n"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPOSITORY}{os.pathsep}{HERE}")
    environment.setdefault("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))
    completed = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = json.loads(completed.stdout.strip().splitlines()[-1])
    assert_losses_close(losses, reference.losses[:2], relative=1e-6)
