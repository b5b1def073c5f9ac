"""Study files: a base config, a grid of dotted config keys and per-value overrides, read into `StudySpec`.

A study file (YAML)::

    name: activations_cpu                    # default: the file's stem
    base: base.yaml                          # the experiment config every run starts from (relative to this file)
    output_dir: runs/studies/activations     # the study folder (relative to the working directory)
    overrides: {training.max_steps: 300}     # dotted keys applied to every run
    grid:                                    # every combination is one run, named from its values
      model.activation: [relu, gelu, swiglu, polyrelu, polynorm]
      training.seed: [0, 1, 2]
    per_value:                               # overrides for the runs where a grid key takes a value
      model.activation:
        polynorm: {optimizer.lr: 2.0e-3}
    select_lr: true                          # a short LR sweep per variant first (see `lr_selection.py`)
    lr_sweep:
      values: [1.0e-3, 2.0e-3, 4.0e-3]       # default: the base lr x (1/3, 1, 3)
      overrides: {training.max_steps: 60}    # what makes a sweep run short
      validation_set: validation             # default: the first set the runs evaluate
    analyze: true                            # `polycom-lm analyze` every finished run
    report_dir: docs/study_cpu               # where `compare` writes the report (default: <output_dir>/report)
    launcher: {nproc_per_node: 2, slurm: {partition: gpu, time: "24:00:00", gpus_per_node: 8}}
    ladder: {sizes: {...}, budget: {...}, lr: {...}}   # a scaling ladder: a size axis and per-size rules (ladder.py)

Every key named in `overrides`, `grid`, `per_value` and `lr_sweep` must be a key of the config schema; an
unknown one is a one-line `ConfigError` naming the study file and the closest valid key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from polycom_lm.config.loading import safe_yaml_load
from polycom_lm.errors import ConfigError
from polycom_lm.study.ladder import Ladder, parse_ladder
from polycom_lm.study.keys import check_key, config_keys, mapping, only  # noqa: F401 (config_keys: re-exported)
from polycom_lm.study.keys import overrides as key_overrides

STUDY_KEYS = (
    "name", "base", "output_dir", "overrides", "grid", "per_value", "select_lr", "lr_sweep", "analyze",
    "report_dir", "launcher", "ladder",
)
LR_SWEEP_KEYS = ("key", "values", "overrides", "validation_set")
LAUNCHER_KEYS = ("nproc_per_node", "slurm")
SLURM_KEYS = ("partition", "time", "gpus_per_node", "cpus_per_task", "mem", "max_parallel", "extra")
SEED_KEY = "training.seed"


@dataclass(frozen=True)
class LRSweep:
    key: str
    values: tuple[float, ...]
    overrides: dict[str, Any]
    validation_set: Optional[str]


@dataclass(frozen=True)
class StudySpec:
    path: Path  # the study file
    name: str
    base: Path
    output_dir: Path
    overrides: dict[str, Any]
    grid: dict[str, list[Any]]  # in file order
    per_value: dict[str, dict[str, dict[str, Any]]]  # grid key -> value label -> overrides
    lr_sweep: Optional[LRSweep]  # set when select_lr is on
    analyze: bool = False
    report_dir: Optional[Path] = None
    nproc_per_node: int = 1
    slurm: dict[str, Any] = field(default_factory=dict)
    ladder: Optional[Ladder] = None  # a scaling ladder (see `ladder.py`): size (and budget) axes before the grid

    @property
    def axis_keys(self) -> list[str]:
        """The keys that name a run: the ladder's axes (size, budget), then the grid's keys."""
        return (self.ladder.axes if self.ladder else []) + list(self.grid)

    @property
    def variant_keys(self) -> list[str]:
        """The keys that define a variant: all but the seed (runs differing only in seed are repeats)."""
        return [key for key in self.axis_keys if key != SEED_KEY]


def value_label(value: Any) -> str:
    """How a grid value appears in run names and tables: `polynorm`, `0.001`, `3`, `true`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def key_label(key: str, keys: list[str]) -> str:
    """The last part of a dotted key (`activation`), or the whole key when another grid key shares it."""
    short = key.rpartition(".")[2]
    return short if sum(other.rpartition(".")[2] == short for other in keys) == 1 else key


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def run_name(assignment: dict[str, Any], keys: list[str]) -> str:
    """`activation-polynorm_seed-0`: the grid values of a run, as a folder name."""
    return "_".join(f"{_name_part(key_label(key, keys))}-{_name_part(value_label(assignment[key]))}" for key in keys)


def load_study(path: Path) -> StudySpec:
    """Read and check a study file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    raw = safe_yaml_load(path.read_text(encoding="utf-8"), str(path))
    raw = mapping(raw, "the top level", path)
    only(raw, STUDY_KEYS, "study", path)
    if not raw.get("base"):
        raise ConfigError(f"{path}: 'base' is missing; name the experiment config the runs start from")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base config {base} not found (a path relative to the study file)")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ConfigError(f"{path}: name {name!r} may hold only letters, digits and . _ + -")
    grid = _grid(raw.get("grid"), path)
    per_value = _per_value(raw.get("per_value"), grid, path)
    overrides = key_overrides(raw.get("overrides"), "overrides", path)
    lr_sweep = _lr_sweep(raw, grid, per_value, overrides, path)
    launcher = mapping(raw.get("launcher"), "launcher", path)
    only(launcher, LAUNCHER_KEYS, "launcher", path)
    slurm = mapping(launcher.get("slurm"), "launcher.slurm", path)
    only(slurm, SLURM_KEYS, "launcher.slurm", path)
    nproc = launcher.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"{path}: launcher.nproc_per_node must be a positive integer, got {nproc!r}")
    analyze = raw.get("analyze", False)
    if not isinstance(analyze, bool):
        raise ConfigError(f"{path}: analyze must be true or false, got {analyze!r}")
    output_dir = Path(str(raw.get("output_dir") or f"runs/studies/{name}"))
    report_dir = Path(str(raw["report_dir"])) if raw.get("report_dir") else None
    ladder = (parse_ladder(raw["ladder"], path, grid, overrides, lr_sweep is not None)
              if raw.get("ladder") is not None else None)
    return StudySpec(path.resolve(), name, base, output_dir, overrides, grid, per_value, lr_sweep, analyze,
                     report_dir, nproc, dict(slurm), ladder)


def _grid(value: Any, study: Path) -> dict[str, list[Any]]:
    example = "e.g. grid: {model.activation: [relu, polynorm], training.seed: [0, 1]}"
    grid_raw = mapping(value, "grid", study)
    if not grid_raw:
        raise ConfigError(f"{study}: the grid is empty; name at least one config key with a list of values, {example}")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        key = check_key(key, "grid key", study)
        if not isinstance(values, list):
            raise ConfigError(f"{study}: grid key {key!r} must have a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{study}: grid key {key!r} has no values; give at least one ({example})")
        labels = [value_label(v) for v in values]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"{study}: grid key {key!r} lists {', '.join(repeated)} more than once")
        grid[key] = list(values)
    return grid


def _per_value(value: Any, grid: dict[str, list[Any]], study: Path) -> dict[str, dict[str, dict[str, Any]]]:
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for key, by_value in mapping(value, "per_value", study).items():
        if key not in grid:
            raise ConfigError(f"{study}: per_value key {key!r} is not a grid key; grid keys: {', '.join(grid)}")
        labels = [value_label(v) for v in grid[key]]
        result[key] = {}
        for grid_value, overrides in mapping(by_value, f"per_value.{key}", study).items():
            label = value_label(grid_value)
            if label not in labels:
                raise ConfigError(
                    f"{study}: per_value.{key} names {label!r}, which is not among the grid's values ({', '.join(labels)})"
                )
            result[key][label] = key_overrides(overrides, f"per_value.{key}.{label}", study)
    return result


def _lr_sweep(raw: dict, grid: dict, per_value: dict, overrides: dict, study: Path) -> Optional[LRSweep]:
    select = raw.get("select_lr", False)
    if not isinstance(select, bool):
        raise ConfigError(f"{study}: select_lr must be true or false, got {select!r}")
    settings = mapping(raw.get("lr_sweep"), "lr_sweep", study)
    only(settings, LR_SWEEP_KEYS, "lr_sweep", study)
    if not select:
        if settings:
            raise ConfigError(f"{study}: lr_sweep is given but select_lr is not true; set select_lr: true or drop lr_sweep")
        return None
    key = check_key(settings.get("key", "optimizer.lr"), "lr_sweep.key", study)
    if key in grid:
        raise ConfigError(f"{study}: {key} is both a grid key and chosen by select_lr; drop one of them")
    for grid_key, by_value in per_value.items():
        for label, value_overrides in by_value.items():
            if key in value_overrides:
                raise ConfigError(
                    f"{study}: per_value.{grid_key}.{label} sets {key}, which select_lr chooses; drop one of them"
                )
    values = settings.get("values")
    if values is not None:
        if not isinstance(values, list) or len(values) < 2:
            raise ConfigError(f"{study}: lr_sweep.values must be a list of at least two learning rates, got {values!r}")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"{study}: lr_sweep.values must be numbers, got {settings['values']!r}") from None
        if any(not v > 0 for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"{study}: lr_sweep.values must be distinct positive numbers, got {values!r}")
    sweep_overrides = key_overrides(settings.get("overrides"), "lr_sweep.overrides", study)
    if key in sweep_overrides:
        raise ConfigError(f"{study}: lr_sweep.overrides sets {key}, which the sweep varies; list it in lr_sweep.values")
    validation_set = settings.get("validation_set")
    return LRSweep(key, tuple(values or ()), sweep_overrides, None if validation_set is None else str(validation_set))
