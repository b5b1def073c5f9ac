"""On 4 gloo processes: FSDP 2 × TP 2 and DDP 2 × TP 2 (2D meshes) reproduce the single-process forward
output, gradients and losses, with PolyNorm (row norms over the full FFN width), PolyReLU and SwiGLU
([gate | up] sharding); and HSDP (replicate 2 × shard 2) reproduces the single-process losses. One
launch for all cases."""

from __future__ import annotations

import json

import pytest

from engine_harness import assert_matches_reference, reference_numbers, run_worker, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    shared = tmp_path_factory.mktemp("fsdp_tp")
    output = shared / "results.json"
    run_worker(4, "fsdp_tp", output, str(shared))
    return json.loads(output.read_text())


@pytest.mark.parametrize(
    "case, activation",
    [
        ("fsdp2_tp2_polynorm", "polynorm"),
        ("fsdp2_tp2_polyrelu", "polyrelu"),
        ("fsdp2_tp2_swiglu", "swiglu"),
        ("ddp2_tp2_polynorm", "polynorm"),
    ],
)
def test_two_dimensional_data_and_tensor_parallel_matches_single_process(results, case, activation):
    measured = results[case]
    assert measured["forward_relative_error"] < 1e-5
    worst = max(measured["gradient_relative_error"].items(), key=lambda item: item[1])
    assert worst[1] < 1e-5, f"gradient of {worst[0]} differs by {worst[1]:.2e}"
    assert_matches_reference(measured, reference_numbers(tiny_config(activation), steps=3), slice(0, 3), relative=1e-5)
    if activation == "polynorm":
        assert measured["naive_shard_norm_relative_error"] > 1e-3


def test_hybrid_sharding_replicate_2_shard_2_matches_single_process(results):
    assert_matches_reference(results["hsdp_replicate2_shard2"], reference_numbers(tiny_config("polynorm"), steps=3),
                             slice(0, 3), relative=1e-6)
