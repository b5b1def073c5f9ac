"""Choosing each variant's learning rate from the LR sweep: the candidate with the lowest final validation
loss (non-finite losses, i.e. diverged runs, lose). The result is kept in `lr_selection.json` of the study
folder and shown in the report, with a warning when the best value is at the edge of the candidates (the
optimum may lie outside the range swept)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from polycom_lm.errors import ConfigError
from polycom_lm.study.grid import PlannedRun
from polycom_lm.study.spec import StudySpec, value_label
from polycom_lm.train.callbacks.metrics_file import read_metrics

SELECTION_FILE = "lr_selection.json"


def final_validation_loss(run_dir: Path, validation_set: Optional[str]) -> tuple[str, float]:
    """(set name, loss) of the last evaluation of `validation_set` (default: the first set evaluated)."""
    metrics = run_dir / "metrics.jsonl"
    rows = [row for row in read_metrics(metrics) if row.get("kind") == "eval"] if metrics.is_file() else []
    if not rows:
        raise ConfigError(
            f"{run_dir} logged no validation loss; the LR sweep needs a validation set (data.validation, or a "
            f"source with a held-out part) and an evaluation at the end of each sweep run"
        )
    name = validation_set or rows[0]["name"]
    chosen = [row for row in rows if row["name"] == name]
    if not chosen:
        names = sorted({row["name"] for row in rows})
        raise ConfigError(f"{run_dir}: no validation set {name!r} (lr_sweep.validation_set); it evaluated {', '.join(names)}")
    loss = chosen[-1]["loss"]
    return name, float(loss) if isinstance(loss, (int, float)) else float("nan")


def select(spec: StudySpec, runs: list[PlannedRun]) -> dict[str, Any]:
    """The selection record: per variant the loss of every candidate, the chosen value and an edge flag.
    `runs` are the finished sweep runs."""
    assert spec.lr_sweep is not None
    key = spec.lr_sweep.key
    variants: dict[str, dict[str, Any]] = {}
    set_name = spec.lr_sweep.validation_set
    for run in runs:
        set_name, loss = final_validation_loss(run.output_dir, spec.lr_sweep.validation_set or set_name)
        entry = variants.setdefault(run.variant, {"grid": {k: v for k, v in run.grid.items() if k != key}, "losses": {}})
        entry["losses"][value_label(run.grid[key])] = loss
        entry.setdefault("_values", []).append(float(run.grid[key]))
    for entry in variants.values():
        values = entry.pop("_values")
        losses = [entry["losses"][value_label(v)] for v in values]
        finite = [(loss, value) for loss, value in zip(losses, values) if math.isfinite(loss)]
        if not finite:
            raise ConfigError(
                f"every LR sweep run of variant {entry['grid']} diverged (non-finite validation loss); sweep smaller "
                f"learning rates (lr_sweep.values)"
            )
        best_loss, best = min(finite)
        entry["best"] = best
        entry["best_loss"] = best_loss
        entry["at_edge"] = best in (min(values), max(values))
    return {"key": key, "validation_set": set_name, "variants": variants,
            "runs": [[run.variant, run.name] for run in runs]}


def chosen_learning_rates(selection: dict[str, Any]) -> dict[str, float]:
    return {variant: entry["best"] for variant, entry in selection["variants"].items()}


def write_selection(output_dir: Path, selection: dict[str, Any]) -> Path:
    path = Path(output_dir) / SELECTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(selection, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def read_selection(output_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(output_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); delete it to select again from the sweep") from None
