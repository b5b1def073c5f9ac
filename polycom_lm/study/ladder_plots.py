"""The ladder report's figures (matplotlib Agg, one PNG each, one colour per activation): loss against
compute with the fitted laws, the compute multiplier against compute with its bootstrap band, the fits'
residuals with the held-out prediction, and validation loss over training per size."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.ticker import NullFormatter

from polycom_lm.study import plots
from polycom_lm.study.ladder_analysis import LadderPoint, cell_means
from polycom_lm.study.runs import RunRecord

plt = plots.plt


def _log_axes(axis, y_log: bool = True) -> None:
    axis.set_xscale("log")
    # Under about two decades matplotlib labels the minor ticks too, and "3×10¹¹ 4×10¹¹" run into each other.
    axis.xaxis.set_minor_formatter(NullFormatter())
    if y_log:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(plots.PLAIN)
        axis.yaxis.set_minor_formatter(plots.PLAIN)
    axis.grid(alpha=0.3, which="both")


def loss_vs_compute(points: Sequence[LadderPoint], analysis: dict[str, Any], palette: dict, measured: str,
                    path: Path) -> Path:
    """Cell means ± seed std (seeds as dots) on log-log axes, the fitted L(C) per activation, and E."""
    fit = analysis["fits"]["compute"]
    figure, axis = plt.subplots(figsize=(8, 5.2))
    compute = np.array([p.compute for p in points])
    grid = np.logspace(math.log10(compute.min() / 1.5), math.log10(compute.max() * 1.5), 200)
    means = cell_means(points)
    for activation in fit.groups:
        colour = palette[activation]
        mine = [p for p in points if p.activation == activation]
        axis.scatter([p.compute for p in mine], [p.loss for p in mine], color=colour, s=9, alpha=0.45, linewidths=0)
        cells = sorted((cell["compute"], cell["loss"], cell["std"]) for key, cell in means.items() if key[0] == activation)
        axis.errorbar([c[0] for c in cells], [c[1] for c in cells], yerr=[0 if math.isnan(c[2]) else c[2] for c in cells],
                      fmt="o", color=colour, markersize=5, capsize=3, linewidth=1.2)
        alpha = fit.alpha[fit.index(activation), 0]
        axis.plot(grid, fit.predict(activation, grid), color=colour, linewidth=1.4,
                  label=f"{activation}: α = {alpha:.3f}")
    axis.axhline(fit.E[0], color="grey", linestyle=":", linewidth=1.2, label=f"E = {fit.E[0]:.3f} (fitted, shared)")
    _log_axes(axis)
    axis.set_xlabel("training compute C (FLOPs: attention, FFN and LM head, forward + backward)")
    axis.set_ylabel(f"{measured} (nats/token)")
    axis.set_title("Loss against compute: L(C) = E + A·C^(−α) per activation\n"
                   "(big dots: mean ± std over seeds of each size; small dots: seeds; lines: fits)")
    axis.legend(fontsize=8)
    return plots._save(figure, path)


def multiplier(analysis: dict[str, Any], palette: dict, path: Path) -> Optional[Path]:
    """M(L*) against the baseline's compute at L*, with the 95% bootstrap band; local multipliers as dots."""
    fit, baseline = analysis["fits"]["compute"], analysis["baseline"]
    estimate, intervals = analysis["estimate"], analysis["intervals"]
    if baseline is None or not any(len(values) for values in analysis["targets"].values()):
        return None
    figure, axis = plt.subplots(figsize=(8, 5))
    for activation, targets in analysis["targets"].items():
        if not len(targets):
            continue
        colour = palette[activation]
        x = fit.compute_at_loss(baseline, np.array(targets))
        y = np.array([estimate[f"M/{activation}/{i}"] for i in range(len(targets))])
        band = np.array([intervals[f"M/{activation}/{i}"] for i in range(len(targets))])
        axis.plot(x, y, color=colour, linewidth=1.6, label=f"{activation} (fit; band: 95% bootstrap)")
        if np.isfinite(band).all():
            axis.fill_between(x, band[:, 0], band[:, 1], color=colour, alpha=0.18, linewidth=0)
        for key, value in estimate.items():
            parts = key.split("/")
            if parts[0] == "local" and parts[1] == activation and math.isfinite(value):
                cell = analysis["cells"][f"{activation}/{parts[2]}/{parts[3]}"]
                axis.scatter([value * cell["compute"]], [value], color=colour, edgecolors="black", s=30, zorder=3)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    _log_axes(axis)
    axis.set_xlabel(f"{baseline}'s training compute to reach the loss (FLOPs)")
    axis.set_ylabel(f"compute multiplier M = C_{baseline} / C_activation")
    axis.set_title(f"Effective compute multiplier against {baseline} (> 1: needs less compute)\n"
                   f"dots: local multipliers at each size (interpolated between {baseline}'s sizes, no fit)")
    axis.legend(fontsize=8)
    return plots._save(figure, path)


def residuals(points: Sequence[LadderPoint], analysis: dict[str, Any], palette: dict, path: Path) -> Path:
    """log L̂ − log L of every run under the full fit (%), and the held-out prediction of the largest size."""
    fit = analysis["fits"]["compute"]
    figure, axis = plt.subplots(figsize=(8, 4.6))
    values = 100 * fit.residuals
    for activation in fit.groups:
        mine = [i for i, p in enumerate(points) if p.activation == activation]
        axis.scatter([points[i].compute for i in mine], values[mine], color=palette[activation], s=14, label=activation)
    held = analysis["held_out"]
    for row in held.get("rows", []):
        compute = next(p.compute for p in points if p.size == held["size"] and p.activation == row["activation"])
        axis.scatter([compute], [100 * row["relative_error"]], marker="*", s=140, color=palette[row["activation"]],
                     edgecolors="black", zorder=3)
    if held.get("rows"):
        axis.scatter([], [], marker="*", s=100, color="white", edgecolors="black",
                     label=f"held out: size {held['size']} predicted by the fit without it")
    axis.axhline(0, color="grey", linewidth=1)
    _log_axes(axis, y_log=False)
    axis.set_xlabel("training compute C (FLOPs)")
    axis.set_ylabel("prediction − observation (% of the loss)")
    axis.set_title("Residuals of L(C) (dots: every run; stars: cell means of the held-out size)")
    axis.legend(fontsize=8)
    return plots._save(figure, path)


def size_curves(by_size: dict[str, dict[str, list[RunRecord]]], palette: dict, path: Path) -> Optional[Path]:
    """Per size (one panel each): validation loss over training tokens per activation, mean ± std over
    seeds (the training loss, smoothed, where a run has no validation set)."""
    if not by_size:
        return None
    figure, axes = plots._grid_figure(len(by_size), width=4.4, height=3.4)
    for axis, (size, groups) in zip(axes, by_size.items()):
        for activation, runs in groups.items():
            if any(run.evaluations for run in runs):
                name = runs[0].evaluations[0]["name"] if runs[0].evaluations else None
                rows_of = lambda run, name=name: [r for r in run.evaluations if r["name"] == name]  # noqa: E731
                plots._mean_band(axis, runs, rows_of, "loss", palette[activation], activation)
            else:
                plots._mean_band(axis, runs, lambda run: run.train, "loss", palette[activation], activation)
        axis.set_title(f"size {size}", fontsize=10)
        axis.set_xlabel("training tokens")
        axis.set_ylabel("validation loss (nats/token)")
        axis.xaxis.set_major_formatter(plots.TOKENS)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Validation loss over training at each size (mean ± std over seeds)")
    figure.tight_layout()
    return plots._save(figure, path)
