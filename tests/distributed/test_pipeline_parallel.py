"""Pipeline parallelism (`distributed.pp`) reproduces one process: losses and pre-clip gradient norms of
the trainer's own step over several steps, dense (PolyNorm, SwiGLU) and MoE, for every schedule that works
here, pp 2 and 4, and pp 2 composed with FSDP 2, DDP 2, TP 2 and EP 2; checkpoints resume across pp
degrees. Negative controls show that the comparison catches the classic pipeline bugs.

Two torchrun launches (2 and 4 gloo ranks, module-scoped fixtures) run every case; each test checks one
claim against `pipeline_worker.trainer_numbers`, the same loop on one process without a pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_harness import Reference, assert_matches_reference, run_worker
from pipeline_worker import pipeline_config, trainer_numbers

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "pipeline_worker.py"
LOSS_TOLERANCE = 1e-6
NORM_TOLERANCE = 1e-5


def _launch(nproc: int, scenario: str, shared: Path) -> dict:
    output = shared / f"{scenario}.json"
    run_worker(nproc, scenario, output, str(shared), timeout_s=300, worker=WORKER)
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def pp2(shared) -> dict:
    return _launch(2, "pp2", shared)


@pytest.fixture(scope="module")
def pp4(shared, pp2) -> dict:  # resumes the checkpoint pp2 saved
    return _launch(4, "pp4", shared)


@pytest.fixture(scope="module")
def reference() -> dict:
    return {name: trainer_numbers(pipeline_config(activation, family), steps=4)
            for name, (activation, family) in {"polynorm": ("polynorm", "dense"), "swiglu": ("swiglu", "dense"),
                                               "moe": ("polynorm", "moe")}.items()}


def expected(reference: dict, case: str) -> dict:
    return reference["moe" if "moe" in case else "swiglu" if "swiglu" in case else "polynorm"]


def as_reference(numbers: dict) -> Reference:
    return Reference(numbers["losses"], numbers["grad_norms"])


PP2_CASES = ["pp2_gpipe_polynorm", "pp2_gpipe_swiglu", "pp2_1f1b_polynorm", "pp2_1f1b_swiglu",
             "pp2_interleaved_1f1b_polynorm", "pp2_interleaved_zero_bubble_polynorm",
             "pp2_uneven_first1_last3_polynorm", "pp2_1f1b_recomputed_blocks_polynorm", "pp2_1f1b_moe_polynorm"]
PP4_CASES = ["pp4_1f1b_polynorm", "pp4_gpipe_swiglu", "pp4_1f1b_moe_polynorm", "pp2_fsdp2_polynorm", "pp2_ddp2_swiglu",
             "pp2_tp2_polynorm", "pp2_tp2_swiglu", "pp2_ep2_moe_polynorm"]


@pytest.mark.parametrize("case", PP2_CASES)
def test_pipeline_on_2_ranks_matches_single_process(pp2, reference, case):
    assert_matches_reference(pp2[case], as_reference(expected(reference, case)), slice(0, 3),
                             relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)


@pytest.mark.parametrize("case", PP4_CASES)
def test_pipeline_on_4_ranks_matches_single_process(pp4, reference, case):
    assert_matches_reference(pp4[case], as_reference(expected(reference, case)), slice(0, 3),
                             relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)


def test_pipeline_with_document_masks_matches_single_process(pp2):
    single = trainer_numbers(pipeline_config(), steps=3, document_ids=True)
    assert_matches_reference(pp2["pp2_1f1b_document_masks_polynorm"], as_reference(single), slice(0, 3),
                             relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)
    # Not vacuous: the masks change the numbers.
    assert single["losses"] != trainer_numbers(pipeline_config(), steps=3)["losses"]


@pytest.mark.parametrize("case", ["pp2_1f1b_moe_polynorm", "pp4_1f1b_moe_polynorm", "pp2_ep2_moe_polynorm"])
def test_moe_auxiliary_losses_sum_every_stage(pp2, pp4, reference, case):
    measured = (pp2 if case in pp2 else pp4)[case]["aux"]
    wanted = reference["moe"]["aux"][:3]
    assert [sorted(step) for step in measured] == [["load_balancing", "router_z"]] * 3
    for step, (actual, target) in enumerate(zip(measured, wanted)):
        for name, value in target.items():
            assert actual[name] == pytest.approx(value, rel=1e-6), f"step {step} {name}"


@pytest.mark.parametrize("case", ["pp2_1f1b_polynorm", "pp4_1f1b_polynorm", "pp2_1f1b_moe_polynorm"])
def test_coefficients_of_every_layer_reach_the_metrics_from_their_stage(pp2, pp4, reference, case):
    measured = (pp2 if case in pp2 else pp4)[case]
    wanted = reference["moe" if "moe" in case else "polynorm"]
    single = trainer_numbers(pipeline_config("polynorm", "moe" if "moe" in case else "dense"), steps=3)
    assert sorted(measured["coefficients"]) == sorted(single["coefficients"])
    assert len(measured["coefficients"]) == 16  # 4 layers x (w0, w1, w2, bias)
    for key, value in single["coefficients"].items():
        assert measured["coefficients"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if "moe" in case:
        assert measured["moe_metrics"] == single["moe_metrics"]
    assert wanted  # the reference fixture ran


@pytest.mark.parametrize("case", ["pp2_1f1b_polynorm", "pp2_interleaved_1f1b_polynorm", "pp4_1f1b_polynorm",
                                  "pp2_tp2_polynorm"])
def test_forward_only_pipeline_evaluation_matches_single_process(pp2, pp4, case):
    measured = (pp2 if case in pp2 else pp4)[case]["eval_loss_sum"]
    single = trainer_numbers(pipeline_config(), steps=3)["eval_loss_sum"]
    assert measured == pytest.approx(single, rel=1e-6)


@pytest.mark.parametrize("control", ["control_scale_grads_default", "control_per_micro_batch_mean",
                                     "control_one_stage_clip_norm"])
def test_negative_controls_fail_the_comparison(pp2, reference, control):
    """The library's default `scale_grads=True`, a loss normalised per micro-batch and a clip norm of one
    stage each change the gradient norms (and, through clipping, the losses) far beyond the tolerance."""
    with pytest.raises(AssertionError):
        assert_matches_reference(pp2[control], as_reference(reference["polynorm"]), slice(0, 3),
                                 relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)


def test_pp2_checkpoint_resumes_bitwise_on_pp2(pp2):
    assert pp2["resume_pp2_on_pp2"]["losses"] == pp2["save_pp2_swiglu"]["losses"][2:4]
    assert pp2["resume_pp2_on_pp2"]["grad_norms"] == pp2["save_pp2_swiglu"]["grad_norms"][2:4]


@pytest.mark.parametrize("case", ["resume_pp2_on_pp4", "resume_pp2_on_pp2_fsdp2"])
def test_pp2_checkpoint_resumes_on_other_layouts(pp4, reference, case):
    assert_matches_reference(pp4[case], as_reference(reference["swiglu"]), slice(2, 4),
                             relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)


def test_pp2_checkpoint_resumes_on_one_process(pp2, shared, reference):
    resumed = trainer_numbers(pipeline_config("swiglu"), steps=2, load_from=shared / "saved_pp2")
    assert_matches_reference(resumed, as_reference(reference["swiglu"]), slice(2, 4),
                             relative=LOSS_TOLERANCE, norm_relative=NORM_TOLERANCE)
