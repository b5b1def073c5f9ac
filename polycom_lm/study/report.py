"""`compare`: runs and studies → `report.md`, `report.json` and PNG figures in one folder.

The folder is written through a temporary sub-folder and the files are renamed into place at the end, so
an error leaves the previous report as it was. A `report.md` not written by this command is never
replaced (unless `force`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from polycom_lm.errors import ConfigError
from polycom_lm.study import plots
from polycom_lm.study.ladder_report import by_size, is_ladder, ladder_palette, ladder_sections
from polycom_lm.study.runs import FINAL_FRACTION, RunRecord, collect, study_variant
from polycom_lm.study.statistics import (
    BASELINE_ACTIVATION,
    baseline_variant,
    consistency_notes,
    differences,
    group_by_variant,
    variant_statistics,
)

MARKER = "<!-- written by polycom-lm compare; regenerated on every run -->"
REPORT_FILES = ("report.md", "report.json", "train_loss.png", "validation.png", "downstream.png", "throughput.png",
                "effective_rank.png", "cosine_similarity.png", "ladder_loss_compute.png", "ladder_multiplier.png",
                "ladder_residuals.png", "ladder_curves.png")


def _timings(studies: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per study run (all launches summed) from each study's timings.jsonl."""
    seconds: dict[str, float] = {}
    for study in studies:
        path = Path(study["folder"]) / "timings.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                key = f"{row.get('phase')}/{row.get('run')}"
                seconds[key] = seconds.get(key, 0.0) + float(row.get("seconds", 0.0))
    return seconds


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _lr_section(studies: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for study in studies:
        selection = study.get("lr_selection")
        if not selection:
            continue
        lines += ["", f"## Learning-rate selection ({study['name']})", "",
                  f"Each variant's {selection['key']} was chosen by a short sweep: the candidate with the lowest "
                  f"final loss on validation set {selection['validation_set']!r}; the full runs use it.", ""]
        rows = []
        variant_keys = study.get("variant_keys", [])
        for entry in selection["variants"].values():
            variant = study_variant(entry["grid"], variant_keys)
            losses = ", ".join(f"{lr}: {loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss)
                               else f"{lr}: diverged" for lr, loss in entry["losses"].items())
            edge = " (edge of the sweep)" if entry.get("at_edge") else ""
            rows.append([variant, f"{entry['best']:g}{edge}", losses])
        lines += _table(["variant", f"chosen {selection['key']}", "final validation loss per candidate"], rows)
    return lines


def _results_section(stats: dict[str, dict[str, Any]], baseline: Optional[str], where: str = "") -> list[str]:
    sets = sorted({name for values in stats.values() for name in values["validation"]})
    tasks = sorted({name for values in stats.values() for name in values["downstream"]})
    header = ["variant", "seeds", "parameters", "peak lr", "tokens/s", "final train loss"]
    header += [f"val loss: {name}" for name in sets] + [f"{name}" for name in tasks]
    rows = []
    for variant, values in stats.items():
        row = [variant, str(len(values["runs"])), f"{values['parameters'].mean:,.0f}",
               ", ".join(f"{lr:g}" for lr in values["learning_rates"]), values["tokens_per_s"].text(0),
               values["train_loss"].text()]
        row += [values["validation"][name].text() if name in values["validation"] else "—" for name in sets]
        row += [values["downstream"][name].text() if name in values["downstream"] else "—" for name in tasks]
        rows.append(row)
    lines = ["", f"## Results{where} (mean ± standard deviation over seeds)", ""] + _table(header, rows)
    lines += ["", f"Final train loss: mean of the logged training losses over the last {FINAL_FRACTION:.0%} of the "
              f"steps; validation and downstream: the last evaluation; tokens/s: the median over logged steps, "
              f"the first left out (compilation and warm-up). Standard deviations are sample (n − 1) ones."]
    if baseline is None:
        lines += ["", f"No difference to a baseline: the runs hold no single {BASELINE_ACTIVATION} variant."]
        return lines
    deltas = differences(stats, baseline)
    metrics = ["train_loss"] + [f"validation/{name}" for name in sets] + [f"downstream/{name}" for name in tasks] + ["tokens_per_s"]
    labels = (["Δ final train loss"] + [f"Δ val loss: {name}" for name in sets] + [f"Δ {name}" for name in tasks]
              + ["Δ tokens/s"])
    rows = [[variant] + [deltas[variant][m].text(0 if m == "tokens_per_s" else 4) if m in deltas[variant] else "—"
                         for m in metrics] for variant in stats if variant != baseline]
    lines += ["", f"## Difference to the {baseline} baseline{where}", "",
              "Variant mean minus baseline mean ± the standard error of that difference, sqrt(s²/n + s_b²/n_b) "
              "(lower loss is better; with one seed no uncertainty can be given).", ""]
    lines += _table(["variant"] + labels, rows)
    return lines


def _analysis_section(groups: dict[str, list[RunRecord]]) -> list[str]:
    rows = []
    for variant, runs in groups.items():
        items = [run.analysis for run in runs if run.analysis]
        if not items:
            continue
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        in_rank = mean([mean(item["effective_rank"]["in_proj"]) for item in items])
        out_rank = mean([mean(item["effective_rank"]["out_proj"]) for item in items])
        cosine = mean([mean(item["cosine_similarity"]["values"]) for item in items])
        limit = items[0]["effective_rank"].get("max_rank", {})
        rows.append([variant, str(len(items)), f"{in_rank:.1f} (of {limit.get('in_proj', '?')})",
                     f"{out_rank:.1f} (of {limit.get('out_proj', '?')})", f"{cosine:.4f}"])
    if not rows:
        return []
    lines = ["", "## The paper's analyses", "",
             "Effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values) of each "
             "layer's FFN projections, averaged over layers (and experts); cosine similarity of each layer's input "
             "and output hidden states, averaged over tokens of a validation batch and over layers "
             "(`polycom-lm analyze`).", ""]
    lines += _table(["variant", "runs", "effective rank in-proj", "effective rank out-proj", "mean cosine similarity"], rows)
    return lines + ["", "![effective rank](effective_rank.png)", "", "![cosine similarity](cosine_similarity.png)"]


def _per_size_sections(records: list[RunRecord], studies: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(the results tables of each ladder size, notes on runs of one size that differ in more than the
    activation); runs outside ladders get the plain tables."""
    lines: list[str] = []
    notes: list[str] = []
    laddered: set[str] = set()
    for study in studies:
        if not is_ladder(study):
            continue
        mine = [record for record in records if record.study == study["name"]]
        for label, by_activation in by_size(mine, study["ladder"]).items():
            size_records = [run for runs in by_activation.values() for run in runs]
            laddered.update(run.name for run in size_records)
            stats = {activation: variant_statistics(runs) for activation, runs in by_activation.items()}
            base = BASELINE_ACTIVATION if BASELINE_ACTIVATION in by_activation else None
            lines += _results_section(stats, base, f" at size {label}")
            notes += [f"size {label}: {note}" for note in consistency_notes(size_records, by_activation)]
    rest = [record for record in records if record.name not in laddered]
    if rest:
        groups = group_by_variant(rest)
        lines += _results_section({v: variant_statistics(runs) for v, runs in groups.items()}, baseline_variant(groups),
                                  " outside the ladder" if laddered else "")
        notes += consistency_notes(rest, groups)
    return lines, notes


def render(records: list[RunRecord], notes: list[str], studies: list[dict[str, Any]], figures: dict[str, Path],
           sources: list[str], ladder_lines: Optional[list[str]] = None,
           ladder_summary: Optional[dict[str, Any]] = None) -> tuple[str, dict[str, Any]]:
    groups = group_by_variant(records)
    stats = {variant: variant_statistics(runs) for variant, runs in groups.items()}
    baseline = baseline_variant(groups)
    timings = _timings(studies)
    title = " + ".join(study["name"] for study in studies) or "runs"
    lines = [MARKER, f"# Activation comparison: {title}", "",
             f"Generated by `polycom-lm compare {' '.join(sources)}` on {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    run_rows = []
    total_seconds = 0.0
    for run in records:
        seconds = timings.get(f"main/{run.path.name}")
        total_seconds += seconds or 0.0
        run_rows.append([run.name, run.variant, str(run.seed), f"{run.last_step}/{run.config.training.max_steps}",
                         f"{run.train[-1]['tokens']:,}", f"{seconds / 60:.1f}" if seconds else "—"])
    lines += ["## Runs", ""] + _table(["run", "variant", "seed", "steps", "tokens", "wall time (min)"], run_rows)
    sweep_seconds = sum(value for key, value in timings.items() if key.startswith("lr_sweep/"))
    if timings:
        lines += ["", f"Wall time of the training runs: {total_seconds / 60:.1f} min"
                  + (f", plus {sweep_seconds / 60:.1f} min for the LR sweep" if sweep_seconds else "")
                  + " (sums of each launch's time, from the studies' timings.jsonl)."]
    if ladder_lines is not None:
        results, size_notes = _per_size_sections(records, studies)
        all_notes = notes + size_notes
    else:
        results, all_notes = _results_section(stats, baseline), notes + consistency_notes(records, groups)
    if all_notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in all_notes]
    lines += _lr_section(studies)
    lines += ladder_lines or []
    lines += results
    lines += ["", "## Curves", ""]
    for name, caption in (("train_loss", "training loss"), ("validation", "validation loss"),
                          ("downstream", "downstream accuracy"), ("throughput", "throughput")):
        if name in figures:
            lines += [f"![{caption}]({figures[name].name})", ""]
    coefficient_figures = [(key, path) for key, path in figures.items() if key.startswith("coefficients/")]
    if coefficient_figures:
        lines += ["## Learned PolyCom coefficients", ""]
        lines += [f"![{key.partition('/')[2]}]({path.name})" for key, path in coefficient_figures]
    lines += _analysis_section(groups)
    summary = {
        "baseline": baseline,
        "notes": all_notes,
        "variants": {variant: {key: (value.to_json() if hasattr(value, "to_json") else
                                     {k: v.to_json() for k, v in value.items()} if isinstance(value, dict) else value)
                               for key, value in values.items()} for variant, values in stats.items()},
        "differences": ({variant: {m: d.to_json() for m, d in row.items()} for variant, row in differences(stats, baseline).items()}
                        if baseline else None),
        "runs": {run.name: {"path": str(run.path), "variant": run.variant, "seed": run.seed} for run in records},
        "ladder": ladder_summary,
    }
    return "\n".join(lines) + "\n", summary


def write_report(paths: list[Path], out: Path, force: bool = False) -> dict[str, Any]:
    """Read the runs, draw the figures and write the report into `out`; returns the summary (report.json)."""
    records, notes, studies = collect([Path(p) for p in paths])
    out = Path(out)
    existing = out / "report.md"
    if existing.is_file() and not force and not existing.read_text(encoding="utf-8", errors="replace").startswith(MARKER):
        raise ConfigError(f"{existing} was not written by polycom-lm compare; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".compare-tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        groups = group_by_variant(records)
        palette = plots.colours(list(groups))
        figures: dict[str, Path] = {}
        ladder_lines: Optional[list[str]] = None
        ladder_summary: dict[str, Any] = {}
        for study in filter(is_ladder, studies):
            mine = [record for record in records if record.study == study["name"]]
            lines, ladder_summary[study["name"]], drawn = ladder_sections(mine, study, staging, ladder_palette(mine))
            ladder_lines = (ladder_lines or []) + lines
            figures.update(drawn)
        if ladder_lines is None:  # a ladder's curves are drawn per size instead (ladder_curves.png)
            figures["train_loss"] = plots.training_loss(groups, palette, staging / "train_loss.png")
            for name, draw in (("validation", plots.validation), ("downstream", plots.downstream)):
                path = draw(groups, palette, staging / f"{name}.png")
                if path is not None:
                    figures[name] = path
        figures["throughput"] = plots.throughput(groups, palette, staging / "throughput.png")
        for variant, runs in groups.items():
            safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in variant)
            path = plots.coefficients(variant, runs, staging / f"coefficients_{safe}.png")
            if path is not None:
                figures[f"coefficients/{variant}"] = path
        plots.analysis(groups, palette, staging)
        text, summary = render(records, notes, studies, figures, [str(p) for p in paths], ladder_lines,
                               ladder_summary or None)
        (staging / "report.md").write_text(text, encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        for stale in out.glob("coefficients_*.png"):
            stale.unlink()
        for name in REPORT_FILES:
            if (out / name).exists() and not (staging / name).exists():
                (out / name).unlink()  # a figure the previous report had and this one has not
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
