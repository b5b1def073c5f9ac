"""The ladder's fits on synthetic data from known laws: L(C) = E + A·C^(−α) (E shared, A and α per
activation) and L(N, D) are recovered exactly from exact data and within stated tolerances from noisy data
and with one bad point (where least squares is shown to be pulled off); the compute multiplier has the
stated sign and value; fits with too few points are refused in one line; the held-out check reports the
error of the largest size."""

from __future__ import annotations

import numpy as np
import pytest

from polycom_lm.study.fits import FitRefused, fit_power_law
from polycom_lm.study.ladder_analysis import (
    LadderPoint,
    analyse,
    fit_compute_law,
    fit_parameter_data_law,
    held_out,
    local_multipliers,
)

E = 1.6
LAWS = {"swiglu": (80.0, 0.15), "polynorm": (60.0, 0.15)}  # (A, α): polynorm is better by (80/60)^(1/0.15)
COMPUTE = np.logspace(12, 16, 6)  # FLOPs, four decades


def law(activation: str, compute):
    A, alpha = LAWS[activation]
    return E + A * np.asarray(compute, dtype=float) ** -alpha


def points(noise: float = 0.0, seeds: int = 1, rng=None, laws=None) -> list[LadderPoint]:
    rng = rng or np.random.default_rng(0)
    result = []
    for activation in laws or LAWS:
        for index, compute in enumerate(COMPUTE):
            for seed in range(seeds):
                loss = float(law(activation, compute) * np.exp(rng.normal(0.0, noise) if noise else 0.0))
                result.append(LadderPoint(f"{activation}-{index}-{seed}", activation, f"s{index}", "", seed,
                                          1000 * (index + 1), 5000 * (index + 1), compute / 1e6, 1e6, loss))
    return result


def test_exact_data_gives_back_the_law():
    fit = fit_compute_law(points())
    assert fit.E[0] == pytest.approx(E, rel=1e-3)
    for activation, (A, alpha) in LAWS.items():
        g = fit.index(activation)
        assert fit.alpha[g, 0] == pytest.approx(alpha, rel=1e-3)
        assert fit.A[g, 0] == pytest.approx(A, rel=1e-2)
    assert np.abs(fit.residuals).max() < 1e-4


def test_noisy_seeds_give_the_law_within_tolerances():
    """0.5% seed noise, 3 seeds: E within 0.1 nats, α within 15%, M at the middle loss within 10%."""
    fit = fit_compute_law(points(noise=0.005, seeds=3, rng=np.random.default_rng(1)))
    assert abs(fit.E[0] - E) < 0.1
    for activation, (_, alpha) in LAWS.items():
        assert fit.alpha[fit.index(activation), 0] == pytest.approx(alpha, rel=0.15)
    middle = float(law("swiglu", 1e14))
    assert fit.multiplier("polynorm", "swiglu", [middle])[0] == pytest.approx((80 / 60) ** (1 / 0.15), rel=0.10)


def test_one_bad_point_barely_moves_the_huber_fit_but_pulls_least_squares():
    data = points(noise=0.002, seeds=2, rng=np.random.default_rng(2))
    bad = next(i for i, p in enumerate(data) if p.activation == "polynorm" and p.size == "s5")
    data[bad] = LadderPoint(**{**data[bad].__dict__, "loss": data[bad].loss * 1.15})  # a diverged-looking run
    groups = [p.activation for p in data]
    compute = np.array([p.compute for p in data])
    losses = np.array([p.loss for p in data])
    huber = fit_power_law(groups, compute, losses, name="L(C)", covariate_names=("C",))
    squares = fit_power_law(groups, compute, losses, name="L(C)", covariate_names=("C",), delta=10.0)
    true_M = (80 / 60) ** (1 / 0.15)
    middle = [float(law("swiglu", 1e14))]
    huber_error = abs(huber.multiplier("polynorm", "swiglu", middle)[0] / true_M - 1)
    squares_error = abs(squares.multiplier("polynorm", "swiglu", middle)[0] / true_M - 1)
    assert huber.alpha[huber.index("polynorm"), 0] == pytest.approx(0.15, rel=0.10)
    assert huber_error < 0.10
    assert squares_error > 2 * huber_error  # the negative control: without Huber the bad point shows


def test_multiplier_is_above_one_for_the_activation_that_needs_less_compute():
    fit = fit_compute_law(points())
    loss = [float(law("swiglu", 1e14))]
    forward = fit.multiplier("polynorm", "swiglu", loss)[0]  # polynorm has the lower loss everywhere
    backward = fit.multiplier("swiglu", "polynorm", loss)[0]
    assert forward > 1 > backward
    assert forward * backward == pytest.approx(1.0)
    assert forward == pytest.approx((80 / 60) ** (1 / 0.15), rel=1e-2)  # equal α: (A_b / A)^(1/α)
    # C_baseline(L*) is the compute at which the baseline's law reaches L*.
    assert fit.compute_at_loss("swiglu", loss)[0] == pytest.approx(1e14, rel=1e-2)


def test_local_multiplier_interpolates_the_baseline_between_its_sizes():
    local = local_multipliers(points(), "swiglu")
    true_M = (80 / 60) ** (1 / 0.15)
    inside = [value for value in local.values() if np.isfinite(value)]
    assert len(inside) >= 4 and all(value == pytest.approx(true_M, rel=0.05) for value in inside)
    assert np.isnan(local[("polynorm", "s5", "")])  # below the baseline's lowest loss: no extrapolation


def test_parameter_data_law_recovers_its_exponents():
    data = []
    for n in np.logspace(5, 7, 4):
        for d in np.logspace(7, 9, 3):
            loss = 1.7 + 400 * n**-0.34 + 900 * d**-0.28
            data.append(LadderPoint(f"{n}-{d}", "swiglu", f"n{n:g}", f"d{d:g}", 0, int(n), int(n) + 10**6, d, 6 * n, loss))
    fit = fit_parameter_data_law(data)
    assert fit.alpha[0] == pytest.approx([0.34, 0.28], rel=0.02)
    assert fit.E[0] == pytest.approx(1.7, rel=0.02)


def test_a_fit_with_too_few_points_is_refused_in_one_line():
    few = [p for p in points(seeds=3) if p.size in ("s0", "s1")]
    with pytest.raises(FitRefused) as error:
        fit_compute_law(few)
    message = str(error.value)
    assert "\n" not in message and "2 distinct compute budgets" in message and "at least 3" in message
    assert "runs at s0, s1" in message
    with pytest.raises(FitRefused, match="3 points; a fit needs at least 5"):
        fit_power_law(["a"] * 3, [1.0, 2.0, 3.0], [3.0, 2.5, 2.2], name="L(C)", covariate_names=("C",))


def test_held_out_check_reports_the_error_of_the_largest_size():
    exact = held_out(points())
    assert exact["size"] == "s5" and max(abs(row["relative_error"]) for row in exact["rows"]) < 1e-3
    bent = [LadderPoint(**{**p.__dict__, "loss": p.loss * 1.02}) if p.size == "s5" else p for p in points()]
    report = held_out(bent)
    assert [round(row["relative_error"], 3) for row in report["rows"]] == [pytest.approx(-0.0196, abs=2e-3)] * 2
    refused = held_out([p for p in points() if p.size in ("s0", "s1", "s2")])
    assert "without size s2" in refused["skipped"]


def test_separate_irreducible_losses_when_asked():
    laws = {"swiglu": (1.6, 80.0, 0.15), "polynorm": (1.5, 60.0, 0.15)}
    data = [LadderPoint(f"{a}-{i}", a, f"s{i}", "", 0, 1000 * (i + 1), 5000 * (i + 1), c / 1e6, 1e6, E_ + A * c**-alpha)
            for a, (E_, A, alpha) in laws.items() for i, c in enumerate(COMPUTE)]
    fit = fit_compute_law(data, shared_E=False)
    assert not fit.shared_E
    assert fit.E == pytest.approx([1.6, 1.5], rel=1e-3)
    assert fit_compute_law(data).E[0] == fit_compute_law(data).E[1]  # shared by default


def test_analyse_fits_parameters_and_data_when_sizes_have_several_budgets():
    data = []
    for activation, A in (("swiglu", 400.0), ("polynorm", 350.0)):
        for n in np.logspace(5, 6.5, 4):
            for multiple in (1, 4):
                d = 20 * n * multiple
                loss = 1.7 + A * n**-0.34 + 900 * d**-0.28
                data.append(LadderPoint(f"{activation}-{n:g}-{multiple}", activation, f"n{n:.0f}", f"{multiple}x", 0,
                                        int(n), int(n) + 10**6, d, 6 * n, loss))
    result = analyse(data, "swiglu", draws=5)
    fit = result["fits"]["parameters_data"]
    assert fit.alpha[fit.index("polynorm")] == pytest.approx([0.34, 0.28], rel=0.05)
    single = analyse([p for p in data if p.budget == "1x"], "swiglu", draws=5)
    assert "parameters_data" not in single["fits"]  # one budget per size: D follows N, L(N, D) is not identified
