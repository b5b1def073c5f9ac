"""Engines on 2 gloo processes reproduce the single-process run: DDP and FSDP2 (fp32 and bf16, with
gradient accumulation), Megatron-style TP 2 (forward, gradients, losses) with PolyNorm, PolyReLU and
SwiGLU, and DCP checkpoints that resume across world sizes and TP degrees.

Everything multi-process runs in one torchrun launch (module-scoped fixture); each test checks one claim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_harness import (
    build_optimizer,
    build_tiny_model,
    assert_matches_reference,
    engine_step,
    fixed_batch,
    reference_numbers,
    run_worker,
    tiny_config,
)
from polycom_lm.distributed.parallelize import build_engine, parallelize

pytestmark = pytest.mark.slow


def single_process_run(config, steps: int, checkpoint_in=None, checkpoint_out=None) -> list[float]:
    engine = build_engine(config, torch.device("cpu"))
    parallelize(build_tiny_model(config), config, engine, build_optimizer)
    if checkpoint_in is not None:
        engine.load_checkpoint(Path(checkpoint_in))
    batch = fixed_batch(config)
    losses = [engine_step(engine, batch, micro_batches=1)[0] for _ in range(steps)]
    if checkpoint_out is not None:
        engine.save_checkpoint(Path(checkpoint_out))
    return losses


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    shared = tmp_path_factory.mktemp("engines")
    # Saved by one process after 2 steps; the 2-rank launch resumes it.
    single_process_run(tiny_config("swiglu", backend="fsdp"), steps=2, checkpoint_out=shared / "saved_on_1")
    output = shared / "results.json"
    run_worker(2, "engines", output, str(shared))
    measured = json.loads(output.read_text())
    measured["shared"] = str(shared)
    return measured


@pytest.fixture(scope="module")
def reference() -> dict:
    return {a: reference_numbers(tiny_config(a), steps=4) for a in ("polynorm", "polyrelu", "swiglu")}


def assert_losses_close(actual, expected, relative):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= relative * abs(e), f"step {step}: {a} vs single-process {e} (rel {abs(a - e) / abs(e):.2e})"


@pytest.mark.parametrize(
    "case",
    ["ddp_fp32_accumulate", "fsdp_fp32_accumulate", "fsdp_cpu_offload", "ddp_fused_cross_entropy", "fsdp_fused_cross_entropy"],
)
def test_data_parallel_engine_fp32_with_accumulation_matches_single_process(results, reference, case):
    assert_matches_reference(results[case], reference["polynorm"], slice(0, 3), relative=1e-6)


def test_fsdp_bf16_mixed_precision_matches_single_process_within_bf16_tolerance(results, reference):
    assert_matches_reference(results["fsdp_bf16"], reference["polynorm"], slice(0, 3), relative=2e-2)
    # Not a vacuous pass: bf16 compute does change the numbers.
    assert results["fsdp_bf16"]["losses"] != pytest.approx(reference["polynorm"].losses[:3], rel=1e-7)


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu", "swiglu"])
def test_tensor_parallel_2_matches_single_process(results, reference, activation):
    case = results[f"tp2_{activation}"]
    assert case["forward_relative_error"] < 1e-5
    worst = max(case["gradient_relative_error"].items(), key=lambda item: item[1])
    assert worst[1] < 1e-5, f"gradient of {worst[0]} differs by {worst[1]:.2e}"
    assert_matches_reference(case, reference[activation], slice(0, 3), relative=1e-5)


@pytest.mark.parametrize("activation", ["polynorm", "polyrelunorm"])
def test_polynorm_naive_per_shard_norm_is_caught(results, activation):
    """Without the TP row-sum reduction the same comparison fails by far more than its tolerance."""
    assert results[f"tp2_{activation}"]["naive_shard_norm_relative_error"] > 1e-3


def test_tp2_checkpoint_resumes_on_one_process(results, reference):
    shared = Path(results["shared"])
    assert_matches_reference(results["save_tp2_swiglu"], reference["swiglu"], slice(0, 4), relative=1e-5)
    continued = single_process_run(
        tiny_config("swiglu", backend="fsdp"), steps=2, checkpoint_in=shared / "saved_on_2"
    )
    assert_losses_close(continued, reference["swiglu"].losses[2:4], relative=1e-5)


def test_single_process_checkpoint_resumes_on_two_ranks(results, reference):
    assert_matches_reference(results["resume_on_2"], reference["swiglu"], slice(2, 4), relative=1e-5)


def test_tp2_checkpoint_consolidates_to_the_canonical_single_process_model(results, tmp_path):
    """The TP 2 SwiGLU checkpoint holds in-proj rows as [gate | up] (not the interleaved shard order):
    the consolidated file equals the single-process model after the same 2 steps."""
    from engine_harness import consolidate_and_compare
    from polycom_lm.cli import main

    run_dir, out = consolidate_and_compare(Path(results["shared"]) / "saved_on_2", tmp_path, "swiglu")
    # Refuses to overwrite what the user has, and names a missing step with the ones available.
    assert main(["checkpoint", "consolidate", str(run_dir), "--step", "2", "--out", str(out)]) == 2
    assert main(["checkpoint", "consolidate", str(run_dir), "--step", "7", "--out", str(tmp_path / "x")]) == 2


def test_sequence_parallel_tp2_matches_single_process(results, reference):
    case = results["tp2_sequence_parallel_polynorm"]
    assert case["forward_relative_error"] < 1e-5
    worst = max(case["gradient_relative_error"].items(), key=lambda item: item[1])
    assert worst[1] < 1e-5, f"gradient of {worst[0]} differs by {worst[1]:.2e}"
    assert_matches_reference(case, reference["polynorm"], slice(0, 3), relative=1e-5)


def test_qk_norm_gain_shared_by_sharded_heads_gets_the_full_gradient(results):
    case = results["tp2_qk_norm_swiglu"]
    assert case["forward_relative_error"] < 1e-5
    for name, error in case["gradient_relative_error"].items():
        assert error < 1e-5, f"gradient of {name} differs by {error:.2e}"
    assert any("q_norm" in name for name in case["gradient_relative_error"])


def test_tp2_with_recomputed_activations_matches_single_process(results, reference):
    assert_matches_reference(results["tp2_recomputed_polynorm"], reference["polynorm"], slice(0, 3), relative=1e-5)


def test_failed_multi_rank_checkpoint_load_is_one_line_on_every_rank(results):
    """A truncated shard file fails the load on both ranks with the one-line CheckpointError naming the
    folder, not DCP's raw `CheckpointException` traceback."""
    folder = str(Path(results["shared"]) / "truncated")
    messages = results["truncated_shard_load_errors"]
    assert len(messages) == 2
    for message in messages:
        assert message.startswith(f"{folder}: cannot load model/optimizer state ("), message[:300]
        assert "\n" not in message
