"""MFU that can be believed: the CPU peak is the best of several matmul sizes (2048³ included) without
touching the run's RNG, and the logged MFU never exceeds 100%: a step faster than the start-up probe
raises the peak to its own rate."""

from __future__ import annotations

import inspect

import pytest
import torch

from polycom_lm.train.flops import measure_matmul_flops
from polycom_lm.train.loop import StepResult, Trainer


def test_the_cpu_peak_probe_times_large_matmuls_and_leaves_the_rng_alone():
    assert max(inspect.signature(measure_matmul_flops).parameters["sizes"].default) >= 2048
    torch.manual_seed(3)
    before = torch.get_rng_state()
    rate = measure_matmul_flops(torch.device("cpu"), torch.float32, sizes=(256, 512), repeats=2)
    assert rate > 0 and torch.equal(torch.get_rng_state(), before)


class _Stub:
    """The parts of a Trainer that `training_row` reads."""

    def __init__(self, peak: float):
        self.flops_per_token = 1e6
        self.peak_flops_per_device = peak
        self.world_size = 2
        self.state = type("State", (), {"step": 3, "tokens": 300, "skipped_steps": 0})()
        self.config = type("Config", (), {"logging": type("L", (), {"log_activation_coefficients": False})()})()
        self.engine = type("Engine", (), {"unwrapped_model": lambda self: torch.nn.Linear(1, 1),
                                          "device": torch.device("cpu"), "pipeline": None})()


@pytest.mark.parametrize("peak, expected_mfu", [(1e7, 1.0), (1e9, 0.05)])
def test_mfu_never_exceeds_one(peak, expected_mfu):
    stub = _Stub(peak)
    window = [StepResult(loss=1.0, grad_norm=1.0, lr=1e-3, tokens=100, step_time_s=0.1, data_wait_s=0.0, finite=True)]
    # 100 tokens in 1 s at 1e6 FLOP per token: 1e8 FLOP/s over 2 devices.
    row = Trainer.training_row(stub, window, elapsed_s=1.0)
    assert row["mfu"] == pytest.approx(expected_mfu)
    assert stub.peak_flops_per_device == max(peak, 5e7)
