"""The ladder's bootstrap over seeds: draws resample seeds within each (size, budget) cell, the same seeds
for every activation; on synthetic ladders with known laws its 95% intervals cover the true exponent and
the true compute multiplier about as often as they should (and a false value rarely: the negative control);
Δα is called non-zero only when the exponents differ."""

from __future__ import annotations

import numpy as np
import pytest

from polycom_lm.study.ladder_analysis import LadderPoint, analyse, bootstrap_samples

E = 1.5
SIZES = np.logspace(11, 14, 5)  # compute of each size, FLOPs


def ladder(rng: np.random.Generator, laws: dict[str, tuple[float, float]], seeds: int = 3, noise: float = 0.01):
    """Runs of every activation at every size; a seed's noise is its own (independent draws)."""
    runs = []
    for activation, (A, alpha) in laws.items():
        for index, compute in enumerate(SIZES):
            for seed in range(seeds):
                loss = (E + A * compute**-alpha) * np.exp(rng.normal(0.0, noise))
                runs.append(LadderPoint(f"{activation}-{index}-{seed}", activation, f"s{index}", "", seed,
                                        10**4 * (index + 1), 10**5 * (index + 1), compute / 1e6, 1e6, float(loss)))
    return runs


def true_multiplier(laws, loss: float) -> float:
    (A_b, a_b), (A, a) = laws["swiglu"], laws["polynorm"]
    return (A_b / (loss - E)) ** (1 / a_b) / (A / (loss - E)) ** (1 / a)


def test_draws_resample_seeds_within_cells_paired_across_activations():
    runs = ladder(np.random.default_rng(0), {"swiglu": (60.0, 0.12), "polynorm": (50.0, 0.12)})
    for sample in bootstrap_samples(runs, 5, np.random.default_rng(1)):
        assert len(sample) == len(runs)
        for size in {p.size for p in runs}:
            seeds = {activation: sorted(p.seed for p in sample if p.size == size and p.activation == activation)
                     for activation in ("swiglu", "polynorm")}
            assert seeds["swiglu"] == seeds["polynorm"]  # paired
            assert all(p.size == size for p in sample if p.size == size)  # no run leaves its cell


def test_intervals_cover_the_true_exponent_and_multiplier():
    laws = {"swiglu": (60.0, 0.12), "polynorm": (50.0, 0.12)}
    covered = {"alpha": 0, "M": 0, "false_M": 0}
    repeats = 16
    for repeat in range(repeats):
        result = analyse(ladder(np.random.default_rng(100 + repeat), laws, seeds=4), "swiglu", draws=50, seed=repeat)
        low, high = result["intervals"]["alpha/polynorm"]
        covered["alpha"] += low <= 0.12 <= high
        target = result["targets"]["polynorm"][12]
        low, high = result["intervals"]["M/polynorm/12"]
        truth = true_multiplier(laws, target)
        covered["M"] += low <= truth <= high
        covered["false_M"] += low <= 1.5 * truth <= high  # a multiplier 50% off
    # 4 seeds per cell: a bootstrap over so few seeds is itself uncertain (even with its spread widened by
    # sqrt(n/(n−1)), see `interval`), so the bar is 75% rather than 95%; observed here: 15 and 16 of 16.
    assert covered["alpha"] >= 0.75 * repeats
    assert covered["M"] >= 0.75 * repeats
    assert covered["false_M"] <= 0.25 * repeats


def test_delta_alpha_is_nonzero_only_when_the_exponents_differ():
    same = analyse(ladder(np.random.default_rng(7), {"swiglu": (60.0, 0.12), "polynorm": (50.0, 0.12)}, noise=0.003),
                   "swiglu", draws=60)
    low, high = same["intervals"]["delta_alpha/polynorm"]
    assert low <= 0 <= high
    steeper = analyse(ladder(np.random.default_rng(7), {"swiglu": (60.0, 0.12), "polynorm": (90.0, 0.16)}, noise=0.003),
                      "swiglu", draws=60)
    low, high = steeper["intervals"]["delta_alpha/polynorm"]
    assert 0 < low and steeper["estimate"]["delta_alpha/polynorm"] == pytest.approx(0.04, abs=0.015)


def test_a_positive_statistic_is_widened_in_log_space_and_stays_positive():
    from polycom_lm.study.ladder_analysis import interval

    draws = [0.2, 0.5, 1.0, 1.5, 1.9]  # an A or a multiplier, estimate 1.0, 2 seeds per cell
    low, high = interval(draws, 1.0, seeds=2)
    assert low < 0  # widened linearly by sqrt(2) it crosses 0, which A and M cannot
    low, high = interval(draws, 1.0, seeds=2, positive=True)
    assert 0 < low < 0.2 and high > 1.9
    assert interval(draws, 1.0, seeds=1, positive=True) == interval(draws, 1.0, seeds=1)  # no widening at n = 1
