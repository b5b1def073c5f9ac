"""What a ladder's runs say about scale: the fits of `fits.py` on the runs' final losses, compute
multipliers against the baseline, a paired bootstrap over seeds and a held-out check.

- Points: one per finished run: its activation, size, budget, seed, non-embedding and total parameters,
  training tokens D, training FLOPs per token (`models/flops.py`: attention, the LM head and every FFN
  matrix counted) and so compute C = FLOPs/token · D, and its final loss.
- L(C) per activation with E shared; L(N, D) when some size has several budgets.
- M(L*) = C_baseline(L*) / C_activation(L*) at target losses inside the range both observed (M > 1: the
  activation needs less compute). Local multiplier of a cell (activation, size, budget): the baseline's
  compute at the cell's mean loss, interpolated log-linearly between the baseline's own cells, over the
  cell's compute (no fit involved; none where the loss lies outside the baseline's range).
- Bootstrap: each draw resamples the seeds of every (size, budget) cell with replacement, the same seeds
  for every activation (paired: activations that share a seed share its data order), and refits. 95%
  intervals are the 2.5 / 97.5 percentiles of the draws, their spread widened by sqrt(n/(n − 1)) for n
  seeds per cell (`interval`; in log space for A and the multipliers); Δα = α − α_baseline "≠ 0" when its
  interval excludes 0 (Δα > 0: the activation's loss falls faster with compute than the baseline's, so it
  gains on it: a lead grows, a deficit shrinks).
- Held out: the laws fitted without the largest size predict its cells' mean losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from polycom_lm.models.flops import parameter_counts, training_flops_per_token
from polycom_lm.study.fits import FitRefused, PowerLawFit, fit_power_law
from polycom_lm.study.runs import RunRecord

TARGETS = 25  # target losses for M(L*) (the report's table shows 5 of them)
INTERVAL = (2.5, 97.5)


@dataclass(frozen=True)
class LadderPoint:
    run: str
    activation: str
    size: str
    budget: str
    seed: int
    non_embedding: int
    total: int
    tokens: float  # training tokens D
    flops_per_token: float  # training (forward + backward) FLOPs per token
    loss: float

    @property
    def compute(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def cell(self) -> tuple[str, str]:
        return self.size, self.budget


def _where(points: Sequence[LadderPoint]) -> dict[str, str]:
    """activation → "sizes a, b" (and budgets), for refusals."""
    shown: dict[str, list[str]] = {}
    several = len({point.budget for point in points}) > 1
    for point in points:
        label = f"{point.size}/{point.budget}" if several else point.size
        shown.setdefault(point.activation, [])
        if label not in shown[point.activation]:
            shown[point.activation].append(label)
    return {activation: "runs at " + ", ".join(labels) for activation, labels in shown.items()}


def fit_compute_law(points: Sequence[LadderPoint], shared_E: bool = True,
                    start: Optional[PowerLawFit] = None) -> PowerLawFit:
    """L(C) = E + A·C^(−α) per activation (E shared unless `shared_E` is false)."""
    return fit_power_law([p.activation for p in points], np.array([p.compute for p in points]),
                         np.array([p.loss for p in points]), name="L(C) = E + A·C^(−α)", covariate_names=("C",),
                         shared_E=shared_E, start=start, what=("compute budgets",), where=_where(points))


def fit_parameter_data_law(points: Sequence[LadderPoint], start: Optional[PowerLawFit] = None) -> PowerLawFit:
    """L(N, D) = E + A/N^a + B/D^b per activation, E shared; N non-embedding parameters, D tokens."""
    return fit_power_law([p.activation for p in points],
                         np.array([[p.non_embedding, p.tokens] for p in points], dtype=float),
                         np.array([p.loss for p in points]), name="L(N, D) = E + A/N^a + B/D^b",
                         covariate_names=("N", "D"), start=start,
                         what=("(N, D) pairs", "non-embedding parameter count", "token budget"), where=_where(points))


def has_several_budgets(points: Sequence[LadderPoint]) -> bool:
    budgets: dict[str, set[float]] = {}
    for point in points:
        budgets.setdefault(point.size, set()).add(round(point.tokens))
    return any(len(values) > 1 for values in budgets.values())


def cell_means(points: Sequence[LadderPoint]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(activation, size, budget) → mean loss, seed standard deviation, compute, N, D and count."""
    cells: dict[tuple[str, str, str], list[LadderPoint]] = {}
    for point in points:
        cells.setdefault((point.activation, *point.cell), []).append(point)
    result = {}
    for key, members in cells.items():
        losses = np.array([p.loss for p in members])
        result[key] = {"loss": float(losses.mean()), "std": float(losses.std(ddof=1)) if len(losses) > 1 else math.nan,
                       "n": len(members), "compute": members[0].compute, "non_embedding": members[0].non_embedding,
                       "total": members[0].total, "tokens": members[0].tokens}
    return result


def target_losses(points: Sequence[LadderPoint], activation: str, baseline: str, count: int = TARGETS) -> np.ndarray:
    """`count` losses spread evenly over the range of cell-mean losses that both activations reached."""
    means = cell_means(points)
    ranges = [[cell["loss"] for key, cell in means.items() if key[0] == name] for name in (activation, baseline)]
    low, high = max(min(r) for r in ranges), min(max(r) for r in ranges)
    return np.linspace(low, high, count) if high > low else np.array([])


def local_multipliers(points: Sequence[LadderPoint], baseline: str) -> dict[tuple[str, str, str], float]:
    """(activation, size, budget) → C_baseline(cell loss) / C_cell, interpolating log C of the baseline's
    cells over their mean loss; nan outside the baseline's range."""
    means = cell_means(points)
    base = sorted((cell["loss"], math.log(cell["compute"])) for key, cell in means.items() if key[0] == baseline)
    result = {}
    if len(base) < 2:
        return result
    losses, log_compute = np.array([b[0] for b in base]), np.array([b[1] for b in base])
    for key, cell in means.items():
        if key[0] == baseline:
            continue
        inside = losses[0] <= cell["loss"] <= losses[-1]
        result[key] = math.exp(np.interp(cell["loss"], losses, log_compute)) / cell["compute"] if inside else math.nan
    return result


def bootstrap_samples(points: Sequence[LadderPoint], draws: int, rng: np.random.Generator) -> Iterator[list[LadderPoint]]:
    """Resampled ladders: in every (size, budget) cell, the seeds drawn with replacement, the same draw for
    every activation (a seed an activation lacks is replaced by one of its own, drawn alike)."""
    cells: dict[tuple[str, str], dict[str, dict[int, LadderPoint]]] = {}
    for point in points:
        cells.setdefault(point.cell, {}).setdefault(point.activation, {})[point.seed] = point
    for _ in range(draws):
        sample: list[LadderPoint] = []
        for by_activation in cells.values():
            seeds = sorted({seed for runs in by_activation.values() for seed in runs})
            drawn = rng.integers(0, len(seeds), len(seeds))
            for runs in by_activation.values():
                own = sorted(runs)
                for index in drawn:
                    seed = seeds[index]
                    sample.append(runs[seed] if seed in runs else runs[own[index % len(own)]])
        yield sample


def interval(values: Sequence[float], estimate: float = math.nan, seeds: int = 0,
             positive: bool = False) -> tuple[float, float]:
    """The 2.5 / 97.5 percentiles of bootstrap `values`. With `seeds` per cell (> 1) the draws' spread
    around `estimate` is widened by sqrt(n / (n − 1)): resampling n seeds gives a mean (n − 1)/n of its
    variance, which with 2 or 3 seeds would make every interval too narrow. A `positive` quantity (A, a
    multiplier) is widened in log space, so that its interval stays above 0."""
    finite = np.array([v for v in values if math.isfinite(v) and (v > 0 or not positive)])
    if not len(finite):
        return math.nan, math.nan
    if seeds > 1 and math.isfinite(estimate) and (estimate > 0 or not positive):
        widen = math.sqrt(seeds / (seeds - 1))
        if positive:
            finite = np.exp(math.log(estimate) + widen * (np.log(finite) - math.log(estimate)))
        else:
            finite = estimate + widen * (finite - estimate)
    low, high = np.percentile(finite, INTERVAL)
    return float(low), float(high)


POSITIVE_PREFIXES = ("A/", "M/", "local/")  # statistics that are positive by construction


def _compute_statistics(fit: PowerLawFit, points: Sequence[LadderPoint], baseline: Optional[str],
                        targets: dict[str, np.ndarray]) -> dict[str, float]:
    """The numbers each bootstrap draw records: E, A, α per activation; Δα, M(L*) and local M against the
    baseline."""
    row: dict[str, float] = {"E": float(fit.E[0])}
    for name in fit.groups:
        g = fit.index(name)
        row[f"A/{name}"], row[f"alpha/{name}"] = float(fit.A[g, 0]), float(fit.alpha[g, 0])
    if baseline in fit.groups:
        for name in fit.groups:
            if name == baseline:
                continue
            row[f"delta_alpha/{name}"] = row[f"alpha/{name}"] - row[f"alpha/{baseline}"]
            for index, value in enumerate(fit.multiplier(name, baseline, targets.get(name, np.array([])))):
                row[f"M/{name}/{index}"] = float(value)
        for key, value in local_multipliers(points, baseline).items():
            row["local/" + "/".join(key)] = value
    return row


def held_out(points: Sequence[LadderPoint]) -> dict[str, Any]:
    """Fit L(C) without the largest size (by non-embedding parameters), predict that size's cell means."""
    largest = max(points, key=lambda p: p.non_embedding).size
    train = [p for p in points if p.size != largest]
    try:
        fit = fit_compute_law(train)
    except FitRefused as error:
        return {"size": largest, "skipped": f"without size {largest}: {error}"}
    rows = []
    for (activation, size, budget), cell in cell_means(points).items():
        if size != largest or activation not in fit.groups:
            continue
        predicted = float(fit.predict(activation, np.array([cell["compute"]]))[0])
        rows.append({"activation": activation, "budget": budget, "observed": cell["loss"], "predicted": predicted,
                     "error": predicted - cell["loss"], "relative_error": (predicted - cell["loss"]) / cell["loss"],
                     "seed_std": cell["std"]})
    worst = max((abs(row["relative_error"]) for row in rows), default=math.nan)
    return {"size": largest, "rows": rows, "max_abs_relative_error": worst,
            "fit": {"E": float(fit.E[0]), "alpha": {g: float(fit.alpha[fit.index(g), 0]) for g in fit.groups}}}


def analyse(points: Sequence[LadderPoint], baseline: Optional[str], draws: int = 200, seed: int = 0,
            shared_E: bool = True) -> dict[str, Any]:
    """Fits, multipliers, bootstrap intervals and the held-out check, as plain data (`fits` holds the
    PowerLawFit objects for the figures; everything else is JSON-ready)."""
    points = list(points)
    fit = fit_compute_law(points, shared_E)
    if baseline not in fit.groups:
        baseline = None
    targets = {name: target_losses(points, name, baseline) for name in fit.groups if baseline and name != baseline}
    estimate = _compute_statistics(fit, points, baseline, targets)
    rng = np.random.default_rng(seed)
    samples = []
    for sample in bootstrap_samples(points, draws, rng):
        try:
            samples.append(_compute_statistics(fit_compute_law(sample, shared_E, start=fit), sample, baseline, targets))
        except FitRefused:
            continue
    seeds = min(cell["n"] for cell in cell_means(points).values())
    intervals = {key: interval([row.get(key, math.nan) for row in samples], estimate[key], seeds,
                               positive=key.startswith(POSITIVE_PREFIXES)) for key in estimate}
    result: dict[str, Any] = {
        "baseline": baseline, "draws": len(samples), "seeds_per_cell": seeds, "estimate": estimate, "intervals": intervals,
        "targets": {name: values.tolist() for name, values in targets.items()},
        "residual_rms": float(np.sqrt(np.mean(fit.residuals**2))),
        "residual_max": float(np.max(np.abs(fit.residuals))), "converged": fit.converged, "optimiser_message": fit.message,
        "held_out": held_out(points), "fits": {"compute": fit},
        "cells": {"/".join(key): cell for key, cell in cell_means(points).items()},
    }
    if has_several_budgets(points):
        try:
            result["fits"]["parameters_data"] = fit_parameter_data_law(points)
        except FitRefused as error:
            result["parameters_data_skipped"] = str(error)
    return result


def loss_of(record: RunRecord, loss: str) -> tuple[str, float]:
    """(what was measured, value) of a run's final loss: `validation` (its first set), `validation:<set>`,
    or `train` (the mean over the last 10% of steps)."""
    if loss == "train":
        return "final training loss", record.final_train_loss()
    final = record.final_validation()
    name = loss.partition(":")[2] or next(iter(final), "")
    if name not in final:
        return f"validation loss {name!r}", math.nan
    return f"validation loss on {name!r}", final[name]


def ladder_points(records: Sequence[RunRecord], ladder: dict[str, Any]) -> tuple[list[LadderPoint], str, list[str]]:
    """(points of the finished runs, what the loss is, notes on runs left out) for a study's ladder record."""
    points, notes, measured = [], [], "loss"
    for record in records:
        training = record.config.training
        if record.last_step < training.max_steps:
            notes.append(f"{record.name} is left out of the ladder's fits: unfinished")
            continue
        measured, loss = loss_of(record, ladder.get("fit", {}).get("loss", "validation"))
        if not (math.isfinite(loss) and loss > 0):
            notes.append(f"{record.name} is left out of the ladder's fits: no finite {measured}")
            continue
        counts = parameter_counts(record.config.model)
        points.append(LadderPoint(
            run=record.name, activation=record.activation, size=str(record.grid.get("size", "")),
            budget=str(record.grid.get("budget", "")), seed=record.seed, non_embedding=counts["non_embedding"],
            total=counts["total"], tokens=float(training.max_steps * (training.global_batch_tokens or training.global_batch_size * training.seq_len)),
            flops_per_token=training_flops_per_token(record.config.model, training.seq_len), loss=loss))
    return points, measured, notes
