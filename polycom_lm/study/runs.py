"""Reading finished (or running) training runs for `compare`: a run folder (`config.yaml` + `metrics.jsonl`)
or a study folder (`study.json`, whose main runs are read), into `RunRecord`s with the numbers the report
needs. Definitions (stated again in the report):

- final training loss: the mean of the logged training losses over the last 10% of the run's steps;
- final validation loss of a set: its last evaluation; final downstream metric: its last row
  (`kind: downstream`, keys task, metric, value, step, tokens);
- throughput: the median tokens/s of the logged training rows, leaving out the first (compilation and
  warm-up) when there are others.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from polycom_lm.config import Config
from polycom_lm.errors import ConfigError
from polycom_lm.models.flops import parameter_counts
from polycom_lm.study.spec import SEED_KEY, key_label, value_label
from polycom_lm.train.callbacks.metrics_file import read_metrics
from polycom_lm.train.output import CONFIG_FILE, METRICS_FILE, config_differences, read_saved_config

STUDY_FILE = "study.json"
ANALYSIS_FILE = Path("analysis") / "analysis.json"
FINAL_FRACTION = 0.1  # of the steps, over which the final training loss is averaged


@dataclass
class RunRecord:
    name: str
    path: Path
    config: Config
    variant: str  # runs of one variant are repeats (seeds)
    grid: dict[str, Any]
    train: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    downstream: list[dict[str, Any]]
    analysis: Optional[dict[str, Any]] = None
    study: Optional[str] = None
    parameters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.config.training.seed

    @property
    def activation(self) -> str:
        return self.config.model.activation

    @property
    def last_step(self) -> int:
        return self.train[-1]["step"] if self.train else 0

    def final_train_loss(self) -> float:
        if not self.train:
            return math.nan
        threshold = self.last_step * (1 - FINAL_FRACTION)
        window = [row["loss"] for row in self.train if row["step"] >= threshold and _finite(row["loss"])]
        return statistics.fmean(window) if window else math.nan

    def final_validation(self) -> dict[str, float]:
        final: dict[str, float] = {}
        for row in self.evaluations:
            final[row["name"]] = _number(row.get("loss"))
        return final

    def final_downstream(self) -> dict[str, float]:
        final: dict[str, float] = {}
        for row in sorted(self.downstream, key=lambda r: r.get("step", 0)):
            final[f"{row['task']}/{row['metric']}"] = _number(row.get("value"))
        return final

    def tokens_per_s(self) -> float:
        values = [row["tokens_per_s"] for row in self.train if _finite(row.get("tokens_per_s"))]
        if len(values) > 1:
            values = values[1:]
        return statistics.median(values) if values else math.nan


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not readable JSON ({error})") from None


def load_run(path: Path, variant: Optional[str] = None, grid: Optional[dict[str, Any]] = None,
             study: Optional[str] = None) -> RunRecord:
    """One run folder; ConfigError when it holds no run or no metrics."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"{path} is not a run folder (no {CONFIG_FILE}) nor a study folder (no {STUDY_FILE})")
    if not (path / METRICS_FILE).is_file():
        raise ConfigError(f"{path} has no {METRICS_FILE}: the run has not logged a step yet")
    config = read_saved_config(path / CONFIG_FILE)
    rows = read_metrics(path / METRICS_FILE)
    train = [row for row in rows if row.get("kind") == "train"]
    if not train:
        raise ConfigError(f"{path / METRICS_FILE} holds no training rows yet")
    record = RunRecord(
        name=path.name,
        path=path,
        config=config,
        variant=variant or config.model.activation,
        grid=grid or {"model.activation": config.model.activation},
        train=train,
        evaluations=[row for row in rows if row.get("kind") == "eval"],
        downstream=[row for row in rows if row.get("kind") == "downstream"],
        study=study,
        parameters=parameter_counts(config.model)["total"],
    )
    if (path / ANALYSIS_FILE).is_file():
        record.analysis = _read_json(path / ANALYSIS_FILE)
    if record.last_step < config.training.max_steps:
        record.notes.append(f"{record.name} is unfinished (step {record.last_step} of {config.training.max_steps})")
    return record


def study_variant(grid: dict[str, Any], variant_keys: list[str]) -> str:
    """The label of a study variant in reports: the value when one grid key defines variants."""
    if not variant_keys:
        return "all"
    if len(variant_keys) == 1:
        return value_label(grid[variant_keys[0]])
    return ", ".join(f"{key_label(key, variant_keys)}={value_label(grid[key])}" for key in variant_keys)


def load_study_runs(folder: Path) -> tuple[list[RunRecord], list[str], dict[str, Any]]:
    """The main runs of a study folder that have logged steps; notes name the ones that have not."""
    study = _read_json(folder / STUDY_FILE)
    if not isinstance(study, dict) or not isinstance(study.get("runs"), list):
        raise ConfigError(f"{folder / STUDY_FILE} is not a study record (no list of runs)")
    records, notes = [], []
    variant_keys = [key for key in study.get("variant_keys", []) if key != SEED_KEY]
    for entry in study["runs"]:
        run_dir = Path(entry["output_dir"])
        if not run_dir.is_absolute() and not run_dir.exists():
            run_dir = folder / "runs" / entry["name"]  # the study folder was moved
        try:
            record = load_run(run_dir, study_variant(entry["grid"], variant_keys), entry["grid"], study.get("name"))
        except ConfigError as error:
            notes.append(f"run {entry['name']} of study {study.get('name')} is left out: {error}")
            continue
        records.append(record)
    return records, notes, study


def _label_loose_runs(records: list[RunRecord]) -> None:
    """Runs given as folders are grouped by activation; runs of one activation whose configs differ in more
    than the seed (say the order r) get those settings in their label, so that they are not averaged."""
    by_activation: dict[str, list[RunRecord]] = {}
    for record in records:
        by_activation.setdefault(record.activation, []).append(record)
    for runs in by_activation.values():
        keys = sorted({key for run in runs[1:] for key in config_differences(runs[0].config, run.config)} - {SEED_KEY})
        for run in runs:
            if keys:
                flat = {key: _get(run.config, key) for key in keys}
                run.variant = f"{run.activation} (" + ", ".join(f"{key_label(k, keys)}={value_label(v)}" for k, v in flat.items()) + ")"
                run.grid = {"model.activation": run.activation, **flat}


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part) if not isinstance(value, dict) else value.get(part)
    return value


def collect(paths: list[Path]) -> tuple[list[RunRecord], list[str], list[dict[str, Any]]]:
    """Run records, notes and study records for the folders given to `compare`."""
    records: list[RunRecord] = []
    loose: list[RunRecord] = []
    notes: list[str] = []
    studies: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path} is not a folder; give run folders or study folders")
        if (path / STUDY_FILE).is_file():
            study_records, study_notes, study = load_study_runs(path)
            study["folder"] = str(path)
            records += study_records
            notes += study_notes
            studies.append(study)
        else:
            loose.append(load_run(path))
    _label_loose_runs(loose)
    records += loose
    if not records:
        raise ConfigError(f"none of {', '.join(str(p) for p in paths)} holds a run with metrics yet")
    names = [record.name for record in records]
    for record in records:
        if names.count(record.name) > 1:
            record.name = f"{record.path.parent.name}/{record.name}"
        notes += record.notes
    return records, notes, studies
