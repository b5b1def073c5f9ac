"""The ladder sections of `compare`'s report: the ladder's setup (sizes, budgets, the rules used), the L(C)
fit table with bootstrap intervals, compute multipliers at target losses and per size, the held-out check,
L(N, D) when there are several budgets per size, the figures, and what the downstream tasks can say at each
size. A ladder that cannot be fitted is one ConfigError line (from `fits.FitRefused`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from polycom_lm.errors import ConfigError
from polycom_lm.eval import TASKS
from polycom_lm.models import ffn_width
from polycom_lm.study import ladder_plots, plots
from polycom_lm.study.fits import FitRefused
from polycom_lm.study.ladder_analysis import analyse, ladder_points
from polycom_lm.study.runs import RunRecord

TABLE_TARGETS = (0, 6, 12, 18, 24)  # of the 25 target losses


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _with_interval(value: float, bounds: tuple[float, float], digits: str = ".3f") -> str:
    if not math.isfinite(value):
        return "—"
    low, high = bounds
    inner = f" [{low:{digits}}, {high:{digits}}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{value:{digits}}{inner}"


def by_size(records: list[RunRecord], ladder: dict[str, Any]) -> dict[str, dict[str, list[RunRecord]]]:
    """size label (with the budget when there are several) → activation → runs, in the ladder's order."""
    result: dict[str, dict[str, list[RunRecord]]] = {}
    several = len(ladder.get("budgets", [])) > 1
    for size in ladder["sizes"]:
        for budget in [b["label"] for b in ladder["budgets"]]:
            label = f"{size}, {budget}" if several else size
            for record in records:
                if record.grid.get("size") == size and record.grid.get("budget", budget) == budget:
                    result.setdefault(label, {}).setdefault(record.activation, []).append(record)
    return result


def _setup(records: list[RunRecord], ladder: dict[str, Any], study: dict[str, Any]) -> list[str]:
    from polycom_lm.models.flops import parameter_counts, training_flops_per_token

    activations = list(dict.fromkeys(record.activation for record in records))
    rows = []
    for label, groups in by_size(records, ladder).items():
        first = next(iter(groups.values()))[0]
        model, training = first.config.model, first.config.training
        counts = parameter_counts(model)
        gated = {activation: ffn_width(runs[0].config.model) for activation, runs in groups.items()}
        lrs = ", ".join(f"{a} {groups[a][0].config.optimizer.lr:.3g}" for a in activations if a in groups)
        flops = {a: training_flops_per_token(groups[a][0].config.model, training.seq_len) for a in groups}
        rows.append([label, f"{model.d_model} × {model.n_layers} ({model.n_heads} heads)",
                     " / ".join(str(w) for w in sorted(set(gated.values()))), f"{counts['non_embedding']:,}",
                     f"{counts['total']:,}", f"{training.max_steps * training.global_batch_size * training.seq_len:,}",
                     f"{training.max_steps:,} × {training.global_batch_size}", str(first.config.schedule.warmup_steps),
                     lrs, " / ".join(f"{v / 1e6:.3f}" for v in sorted(set(flops.values())))])
    budgets = (", ".join(b["label"] for b in ladder["budgets"]) + " tokens" if ladder["budgets"][0]["tokens"]
               else ", ".join(b["label"] for b in ladder["budgets"]) + f" × {ladder['tokens_per_parameter']:g} tokens per parameter")
    warmup = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in ladder["warmup"].items())
    batch = ("fixed" if ladder["batch"]["rule"] == "fixed" else
             f"global_batch_size · (N / {ladder['batch']['reference_parameters']:,.0f})^{ladder['batch']['exponent']:g}")
    lines = ["", f"## Scaling ladder ({study['name']})", "",
             f"{len(ladder['sizes'])} sizes × {len(activations)} activations × seeds; N = {ladder['parameters'].replace('_', '-')} "
             f"parameters (the baseline {ladder['baseline']}'s; non-gated activations are 3/2 as wide at every size, so N "
             f"matches); budgets: {budgets}. Learning rate: {ladder['lr_description']}. Batch: {batch}. Warmup: {warmup}; schedule "
             f"{ladder['schedule']['name']} over each run's own length (to lr_min_ratio at its last step).", ""]
    header = ["size", "d_model × layers", "FFN width (gated / non-gated)", "non-embedding params", "total params",
              "tokens", "steps × batch (seq.)", "warmup steps", "peak lr", "training MFLOPs/token"]
    return lines + _table(header, rows) + [
        "", "Training FLOPs per token: 6 × every matmul weight a token meets (attention projections, all FFN matrices "
        "(SwiGLU's three, the non-gated activations' two wider ones), the LM head) + 6·L·H·Q·T for causal attention "
        "(`polycom-lm info` prints the breakdown); element-wise work (norms, the activations themselves) is not counted. "
        "At these sizes the LM head is a large share of the compute."]


def _fit_section(analysis: dict[str, Any], measured: str) -> list[str]:
    fit, baseline = analysis["fits"]["compute"], analysis["baseline"]
    estimate, intervals = analysis["estimate"], analysis["intervals"]
    rows = []
    for name in fit.groups:
        delta = f"delta_alpha/{name}"
        verdict = "—"
        if delta in estimate:
            low, high = intervals[delta]
            verdict = (f"gains on {baseline} as compute grows (Δα > 0: its loss falls faster)" if low > 0
                       else f"loses ground to {baseline} as compute grows (Δα < 0: its loss falls slower)" if high < 0
                       else "no evidence that it changes (interval includes 0)") if math.isfinite(low) else "—"
        rows.append([name, _with_interval(estimate[f"A/{name}"], intervals[f"A/{name}"], ".4g"),
                     _with_interval(estimate[f"alpha/{name}"], intervals[f"alpha/{name}"], ".4f"),
                     _with_interval(estimate.get(delta, math.nan), intervals.get(delta, (math.nan, math.nan)), "+.4f"),
                     verdict])
    lines = ["", "### Fit: L(C) = E + A·C^(−α)", "",
             f"Fitted to every finished run's {measured} (each seed a point), C in FLOPs; E shared by all activations, "
             f"A and α per activation; Huber loss (δ = 1e-3) on log L, L-BFGS-B from a grid of 16 starts, bounds "
             f"E ∈ [0, min L], α ∈ [0.01, 2]. E = {_with_interval(estimate['E'], intervals['E'], '.4f')} nats. Brackets: "
             f"95% bootstrap intervals over {analysis['draws']} draws (seeds resampled within each size, paired across "
             f"activations, each draw refitted; the draws' spread widened by √(n/(n−1)) for n = "
             f"{analysis['seeds_per_cell']} seeds per cell). Residuals: RMS {100 * analysis['residual_rms']:.2f}% of the loss, largest "
             f"{100 * analysis['residual_max']:.2f}%{_convergence(analysis)}.", ""]
    lines += _table(["activation", "A", "α", f"Δα = α − α_{baseline}" if baseline else "Δα", "the gap to the baseline"], rows)
    if analysis["draws"] and analysis["draws"] < 100:
        lines += ["", f"Only {analysis['draws']} bootstrap draws: the intervals are rough."]
    return lines


def _convergence(analysis: dict[str, Any]) -> str:
    if analysis["converged"]:
        return ""
    message = analysis.get("optimiser_message") or "no message"
    return f"; L-BFGS-B stopped without reporting convergence ({message}; the residuals say how well the law fits)"


def _multiplier_section(analysis: dict[str, Any], several_budgets: bool) -> list[str]:
    fit, baseline = analysis["fits"]["compute"], analysis["baseline"]
    estimate, intervals = analysis["estimate"], analysis["intervals"]
    if baseline is None:
        return ["", "No compute multiplier: the ladder has no baseline activation's runs."]
    lines = ["", f"### Effective compute multiplier against {baseline}", "",
             f"M(L*) = C_{baseline}(L*) / C_activation(L*) from the fits, at target losses spread over the range both "
             f"activations observed: M > 1 means the activation reaches L* with M times less compute than {baseline}. "
             f"[95% bootstrap interval]; the interval including 1 means no detectable difference.", ""]
    for name, targets in analysis["targets"].items():
        if not len(targets):
            lines += [f"- {name}: its losses and {baseline}'s do not overlap; no multiplier inside the observed range."]
            continue
        rows = [[f"{targets[i]:.4f}", f"{float(fit.compute_at_loss(baseline, [targets[i]])[0]):.3g}",
                 _with_interval(estimate[f"M/{name}/{i}"], intervals[f"M/{name}/{i}"])] for i in TABLE_TARGETS
                if i < len(targets)]
        lines += ["", f"**{name}**", ""] + _table(["target loss L*", f"{baseline} compute at L* (FLOPs)", "M(L*)"], rows)
    names = [name for name in fit.groups if name != baseline]
    cells = list(dict.fromkeys(key.split("/", 1)[1] for key in analysis["cells"]))  # size/budget, in run order
    rows = []
    for cell in cells:
        size, budget = cell.split("/", 1)
        row = [f"{size}, {budget}" if several_budgets else size]
        for name in names:
            key = f"local/{name}/{cell}"
            row.append(_with_interval(estimate.get(key, math.nan), intervals.get(key, (math.nan, math.nan))))
        rows.append(row)
    lines += ["", f"Local multiplier at each size: {baseline}'s compute at the cell's mean loss (interpolated "
              f"log-linearly between {baseline}'s own sizes, no fit) over the cell's compute; — where the loss lies "
              f"outside {baseline}'s range.", ""]
    return lines + _table(["size"] + names, rows)


def _held_out_section(held: dict[str, Any], several_budgets: bool) -> list[str]:
    lines = ["", "### Held-out check", ""]
    if "skipped" in held:
        return lines + [f"Not possible: {held['skipped']}."]
    rows = [[row["activation"] + (f" ({row['budget']})" if several_budgets else ""), f"{row['observed']:.4f}",
             f"{row['predicted']:.4f}", f"{row['error']:+.4f}", f"{100 * row['relative_error']:+.2f}%",
             "—" if math.isnan(row["seed_std"]) else f"{row['seed_std']:.4f}"] for row in held["rows"]]
    worst = 100 * held["max_abs_relative_error"]
    std = max((row["seed_std"] for row in held["rows"] if math.isfinite(row["seed_std"])), default=math.nan)
    lines += [f"L(C) fitted without the largest size ({held['size']}) predicts that size's mean losses:", ""]
    lines += _table(["activation", "observed", "predicted", "error (nats)", "relative", "seed std"], rows)
    return lines + ["", f"How far the law can be trusted: one size step beyond the fitted range, to within {worst:.2f}% "
                    f"of the loss (the worst activation), against a seed-to-seed standard deviation of up to "
                    f"{std:.4f} nats. Differences between activations smaller than that error are not predictions the "
                    f"law can make."]


def _parameters_data_section(analysis: dict[str, Any]) -> list[str]:
    if "parameters_data_skipped" in analysis:
        return ["", f"L(N, D) not fitted: {analysis['parameters_data_skipped']}."]
    fit = analysis["fits"].get("parameters_data")
    if fit is None:
        return []
    rows = [[name, f"{fit.A[g, 0]:.4g}", f"{fit.alpha[g, 0]:.4f}", f"{fit.A[g, 1]:.4g}", f"{fit.alpha[g, 1]:.4f}"]
            for g, name in enumerate(fit.groups)]
    return ["", "### Fit: L(N, D) = E + A/N^a + B/D^b", "",
            f"N non-embedding parameters, D tokens; E = {fit.E[0]:.4f} shared; point estimates (no bootstrap).", ""] + \
        _table(["activation", "A", "a", "B", "b"], rows)


def downstream_notes(records: list[RunRecord], ladder: dict[str, Any]) -> list[str]:
    """Per size, whether every zero-shot accuracy is within 2 standard errors of chance for every activation."""
    lines = []
    for label, groups in by_size(records, ladder).items():
        above = []
        for activation, runs in groups.items():
            scores: dict[str, list[tuple[float, float]]] = {}
            for run in runs:
                for row in run.downstream:
                    if row["metric"] in ("acc", "acc_norm") and isinstance(row.get("value"), (int, float)):
                        scores.setdefault(f"{row['task']}/{row['metric']}", []).append((row["value"], row.get("stderr") or 0.0))
            for name, values in scores.items():
                task = name.partition("/")[0]
                chance = TASKS[task].chance if task in TASKS else None
                if chance is None:
                    continue
                mean = sum(v for v, _ in values) / len(values)
                error = sum(e for _, e in values) / len(values) / math.sqrt(len(values))
                if mean - chance > 2 * error:
                    above.append(f"{activation} {name} {mean:.3f} (chance {chance:g})")
        if not any(run.downstream for runs in groups.values() for run in runs):
            continue
        lines.append(f"- size {label}: " + ("every task at chance level (each accuracy within 2 standard errors of a "
                                            "uniform guess, for every activation): its downstream numbers carry no signal."
                                            if not above else "above chance: " + "; ".join(above) + "."))
    return ["", "### Downstream tasks at scale", ""] + lines if lines else []


def ladder_sections(records: list[RunRecord], study: dict[str, Any], staging: Path, palette: dict) -> tuple[list[str], dict, dict[str, Path]]:
    """(markdown lines, JSON summary, figures) of one ladder study's runs."""
    ladder = study["ladder"]
    points, measured, notes = ladder_points(records, ladder)
    fit_settings = ladder.get("fit", {})
    try:
        analysis = analyse(points, ladder.get("baseline"), fit_settings.get("bootstrap", 200),
                           fit_settings.get("seed", 0), fit_settings.get("shared_E", True))
    except FitRefused as error:
        raise ConfigError(f"ladder {study['name']}: {error}") from None
    figures: dict[str, Path] = {}
    for key, draw in (("ladder_loss_compute", lambda p: ladder_plots.loss_vs_compute(points, analysis, palette, measured, p)),
                      ("ladder_multiplier", lambda p: ladder_plots.multiplier(analysis, palette, p)),
                      ("ladder_residuals", lambda p: ladder_plots.residuals(points, analysis, palette, p)),
                      ("ladder_curves", lambda p: ladder_plots.size_curves(by_size(records, ladder), palette, p))):
        path = draw(staging / f"{key}.png")
        if path is not None:
            figures[key] = path
    lines = _setup(records, ladder, study) + (["", "Left out: " + "; ".join(notes) + "."] if notes else [])
    several = len(ladder["budgets"]) > 1
    lines += _fit_section(analysis, measured) + _multiplier_section(analysis, several)
    lines += _held_out_section(analysis["held_out"], several)
    lines += _parameters_data_section(analysis)
    lines += ["", "### Figures", ""] + [f"![{key.replace('_', ' ')}]({path.name})" for key, path in figures.items()]
    lines += downstream_notes(records, ladder)
    summary = {key: value for key, value in analysis.items() if key != "fits"}
    summary["fits"] = {name: {"groups": list(fit.groups), "covariates": list(fit.covariates), "E": fit.E.tolist(),
                              "A": fit.A.tolist(), "alpha": fit.alpha.tolist(), "converged": fit.converged}
                       for name, fit in analysis["fits"].items()}
    summary["measured"] = measured
    return lines, summary, figures


def ladder_palette(records: list[RunRecord]) -> dict[str, Any]:
    return plots.colours(list(dict.fromkeys(record.activation for record in records)))


def is_ladder(study: Optional[dict[str, Any]]) -> bool:
    return bool(study and study.get("ladder"))
