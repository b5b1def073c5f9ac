"""Expanding a study into runs: one `PlannedRun` per grid combination (and, with `select_lr`, one per
variant and candidate learning rate), each with its fully resolved config.

Layout of a study folder (`StudySpec.output_dir`)::

    study.json                  the study: grid, LR selection, every run with its grid values and config
    configs/<run>.yaml          each run's resolved config (what `polycom-lm train` is given)
    runs/<run>/                 each run's training folder (config.yaml, metrics.jsonl, checkpoints/)
    lr_sweep/configs/, lr_sweep/runs/   the same for the LR sweep's runs
    lr_selection.json           the sweep's validation losses and each variant's chosen learning rate
    logs/<run>.log              the output of each launch, appended on every resume
    timings.jsonl               wall time of each launch

The overrides of a run are applied to the base config in this order: the study's `overrides`, the run's
grid values, the `per_value` overrides of those values, (ladders) the size's settings and what the
ladder's rules give that size and budget (`ladder.rule_settings`), then (sweep runs) `lr_sweep.overrides`
and the candidate learning rate, or (main runs under `select_lr`) the chosen one. A ladder's runs are
named by size (and budget, when there are several) first: `size-d32L2_activation-polynorm_seed-0`. On top, the study sets
`training.output_dir`, the wandb group (the study name, unless the overrides set one), run name and tags
(`study:<name>` and each grid value as `key=value`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from polycom_lm.config import Config, load_config
from polycom_lm.errors import ConfigError, PolycomError, first_line
from polycom_lm.study.ladder import BUDGET, SIZE, rule_settings
from polycom_lm.study.spec import SEED_KEY, StudySpec, key_label, run_name, value_label
from polycom_lm.train.validation import validate_config

MAIN, LR_SWEEP = "main", "lr_sweep"


@dataclass
class PlannedRun:
    name: str
    phase: str  # MAIN or LR_SWEEP
    grid: dict[str, Any]  # the run's grid values (sweep runs: the variant's, the seed and the candidate lr)
    variant: str  # runs of one variant differ only in their seed
    overrides: dict[str, Any]
    config: Config
    config_path: Path
    output_dir: Path
    lr_pending: bool = False  # a main run under select_lr before the sweep chose its learning rate

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase,
            "variant": self.variant,
            "grid": {key: value for key, value in self.grid.items()},
            "config_file": str(self.config_path),
            "output_dir": str(self.output_dir),
            "lr_pending": self.lr_pending,
            "config": self.config.to_dict(),
        }


def variant_label(assignment: dict[str, Any], spec: StudySpec) -> str:
    keys = spec.variant_keys
    return run_name(assignment, keys) if keys else "all"


def assignments(spec: StudySpec) -> list[dict[str, Any]]:
    """Every combination of axis values (a ladder's size and budget, then the grid's keys), the first
    varying slowest. A ladder's runs always carry their budget, named or not."""
    axes = {key: list(values) for key, values in spec.grid.items()}
    if spec.ladder is not None:
        axes = {SIZE: list(spec.ladder.sizes), BUDGET: [budget.label for budget in spec.ladder.budgets], **axes}
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[key] for key in keys))]


def _variants(spec: StudySpec) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for assignment in assignments(spec):
        variant = {key: assignment[key] for key in spec.variant_keys}
        seen.setdefault(variant_label(variant, spec), variant)
    return list(seen.values())


def default_lr_values(base_lr: float) -> tuple[float, ...]:
    """The base learning rate x (1/3, 1, 3), to 3 significant digits."""
    return tuple(float(f"{base_lr * factor:.3g}") for factor in (1 / 3, 1.0, 3.0))


def lr_values(spec: StudySpec, world_size: int = 1) -> tuple[float, ...]:
    assert spec.lr_sweep is not None
    if spec.lr_sweep.values:
        return spec.lr_sweep.values
    base = _build(spec, "lr-default", dict(spec.overrides), world_size)
    return default_lr_values(float(_get(base, spec.lr_sweep.key)))


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _per_value_overrides(spec: StudySpec, assignment: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key, value in assignment.items():
        merged.update(spec.per_value.get(key, {}).get(value_label(value), {}))
    return merged


def _build(spec: StudySpec, name: str, overrides: dict[str, Any], world_size: int, validate: bool = True) -> Config:
    """The base config with `overrides` applied and (unless not `validate`) validated for `world_size` processes."""
    arguments = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    try:
        config = load_config(spec.base, arguments)
        if validate:
            validate_config(config, world_size)
    except PolycomError as error:
        raise ConfigError(f"{spec.path}: run {name}: {first_line(error)}") from None
    return config


def _run_overrides(spec: StudySpec, name: str, assignment: dict[str, Any], world_size: int,
                   sweep: bool = False) -> tuple[dict[str, Any], Optional[Config]]:
    """(overrides, the config before the ladder's rules or None): the study's overrides, the run's grid
    values and their per_value overrides; for a ladder then the size's settings and what the ladder's
    rules give that size and budget (`ladder.rule_settings`)."""
    grid_values = {key: value for key, value in assignment.items() if key in spec.grid}
    overrides = {**spec.overrides, **grid_values, **_per_value_overrides(spec, assignment)}
    if spec.ladder is None:
        return overrides, None
    size = assignment[SIZE]
    overrides.update(spec.ladder.sizes[size])
    budget = spec.ladder.budget(assignment.get(BUDGET, spec.ladder.budgets[0].label))
    config = _build(spec, name, overrides, world_size, validate=False)
    try:
        rules = rule_settings(spec.ladder, config, size, budget, world_size, sweep)
    except PolycomError as error:
        raise ConfigError(f"{spec.path}: run {name}: {first_line(error)}") from None
    return {**overrides, **rules}, config


def _study_settings(spec: StudySpec, name: str, assignment: dict[str, Any], output_dir: Path,
                    overrides: dict[str, Any], base_tags: list[str]) -> dict[str, Any]:
    keys = list(assignment)
    tags = [f"study:{spec.name}"] + [f"{key_label(key, keys)}={value_label(value)}" for key, value in assignment.items()]
    settings = {
        "training.output_dir": str(output_dir),
        "logging.wandb_run_name": name,
        "logging.wandb_tags": list(dict.fromkeys([*base_tags, *tags])),
    }
    if "logging.wandb_group" not in overrides:
        settings["logging.wandb_group"] = spec.name
    return settings


def _plan(spec: StudySpec, name: str, phase: str, assignment: dict[str, Any], variant: str,
          overrides: dict[str, Any], world_size: int, lr_pending: bool = False,
          preliminary: Optional[Config] = None) -> PlannedRun:
    """`preliminary`: a config the base's wandb tags can be read from (a ladder's, before its rules)."""
    folder = spec.output_dir / (LR_SWEEP if phase == LR_SWEEP else "")
    output_dir = folder / "runs" / name
    config_path = folder / "configs" / f"{name}.yaml"
    preliminary = preliminary or _build(spec, name, overrides, world_size)
    settings = _study_settings(spec, name, assignment, output_dir, overrides, list(preliminary.logging.wandb_tags or []))
    config = _build(spec, name, {**overrides, **settings}, world_size)
    return PlannedRun(name, phase, dict(assignment), variant, overrides, config, config_path, output_dir, lr_pending)


def sweep_runs(spec: StudySpec, world_size: int = 1) -> list[PlannedRun]:
    """The LR sweep: every variant at every candidate learning rate, with the first seed of the grid."""
    if spec.lr_sweep is None:
        return []
    sweep = spec.lr_sweep
    seed = {SEED_KEY: spec.grid[SEED_KEY][0]} if SEED_KEY in spec.grid else {}
    runs = []
    for variant in _variants(spec):
        label = variant_label(variant, spec)
        for lr in lr_values(spec, world_size):
            name = f"{label}_lr-{value_label(lr)}"
            assignment = {**variant, **seed, sweep.key: lr}
            overrides, preliminary = _run_overrides(spec, name, {**variant, **seed}, world_size, sweep=True)
            overrides = {**overrides, **sweep.overrides, sweep.key: lr}
            runs.append(_plan(spec, name, LR_SWEEP, assignment, label, overrides, world_size, preliminary=preliminary))
    _check_unique(runs, spec)
    return runs


def main_runs(spec: StudySpec, chosen_lr: Optional[dict[str, float]] = None, world_size: int = 1) -> list[PlannedRun]:
    """One run per grid combination. Under select_lr, `chosen_lr` maps variant labels to their learning
    rates; a variant without one keeps the base value and is marked `lr_pending`."""
    keys = spec.axis_keys
    runs = []
    for assignment in assignments(spec):
        name = run_name(assignment, keys)
        variant = variant_label({key: assignment[key] for key in spec.variant_keys}, spec)
        overrides, preliminary = _run_overrides(spec, name, assignment, world_size)
        pending = False
        if spec.lr_sweep is not None:
            if chosen_lr is not None and variant in chosen_lr:
                overrides[spec.lr_sweep.key] = chosen_lr[variant]
            else:
                pending = True
        runs.append(_plan(spec, name, MAIN, assignment, variant, overrides, world_size, pending, preliminary))
    _check_unique(runs, spec)
    return runs


def _check_unique(runs: list[PlannedRun], spec: StudySpec) -> None:
    seen: dict[str, PlannedRun] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(
                f"{spec.path}: grid values {seen[run.name].grid} and {run.grid} give the same run name "
                f"{run.name!r}; make the values distinct after replacing characters other than letters, digits, . _ + -"
            )
        seen[run.name] = run
