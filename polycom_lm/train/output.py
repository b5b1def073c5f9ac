"""The run's output folder: decide whether to start, resume or refuse, before anything is written.

`plan_output(config, resume, overwrite)` only reads; it raises a one-line `ConfigError` /
`CheckpointError` for every conflict, so a refused run leaves the folder exactly as it was.
`prepare_output(plan, config)` (main process only) then makes the folder ready.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from polycom_lm.config import Config, config_from_dict
from polycom_lm.errors import CheckpointError, ConfigError, PolycomError, first_line
from polycom_lm.checkpoint.folders import latest_checkpoint, remove_incomplete
from polycom_lm.train.trainer_state import read_trainer_state
from polycom_lm.train.callbacks.metrics_file import truncate_metrics_after

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# What a run writes into its folder; --overwrite removes these and nothing else.
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR, "tensorboard", "wandb", "wandb_run_id", "profile")
# Keys that change how a run is watched or launched, not what it computes.
OPERATIONAL_KEYS = (
    "logging.",
    "training.device",
    "training.profile_",
    "data.preprocess_workers",
    "distributed.timeout_minutes",
)


@dataclass(frozen=True)
class OutputPlan:
    output_dir: Path
    resume_from: Optional[Path]  # a checkpoint folder, or None to start from scratch
    overwrite: bool  # remove the previous run's artifacts first
    previous_config_differs: bool


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def config_differences(saved: Config, current: Config) -> list[str]:
    """Dotted keys whose values differ, ignoring operational keys (logging, device, profiling)."""
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and not k.startswith(OPERATIONAL_KEYS)]


def read_saved_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return config_from_dict(raw)
    except (yaml.YAMLError, PolycomError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable polycom_lm config ({first_line(error)}); pass --overwrite to "
            f"replace the run in {path.parent}"
        ) from None


def plan_output(config: Config, resume: Optional[str], overwrite: bool) -> OutputPlan:
    """Decide what to do with `training.output_dir`.

    `resume`: None (resume automatically when the folder holds this same run), "latest" (resume even if the
    config changed), or a checkpoint folder path.
    """
    output_dir = Path(config.training.output_dir)
    if overwrite and resume is not None:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"training.output_dir {output_dir} exists and is not a folder")
    checkpoints = output_dir / CHECKPOINTS_DIR
    if overwrite:
        return OutputPlan(output_dir, None, True, False)
    if resume not in (None, "latest"):
        explicit = Path(resume)
        read_trainer_state(explicit)  # a one-line CheckpointError when it is not a checkpoint
        holds_other_run = (output_dir / CONFIG_FILE).is_file() or (checkpoints / "latest").is_file()
        if holds_other_run and explicit.resolve().parent != checkpoints.resolve():
            raise ConfigError(
                f"--resume {explicit}: training.output_dir {output_dir} already holds another run; continue "
                f"into a new training.output_dir (or resume from one of {checkpoints}'s own checkpoints)"
            )
        differs = bool((output_dir / CONFIG_FILE).is_file() and config_differences(
            read_saved_config(output_dir / CONFIG_FILE), config))
        return OutputPlan(output_dir, explicit, False, differs)
    saved_config_path = output_dir / CONFIG_FILE
    holds_run = saved_config_path.is_file() or (checkpoints / "latest").is_file()
    if not holds_run:
        if resume == "latest":
            raise CheckpointError(f"--resume: {output_dir} holds no run to resume; drop --resume to start one")
        return OutputPlan(output_dir, None, False, False)
    differences = (
        config_differences(read_saved_config(saved_config_path), config) if saved_config_path.is_file() else []
    )
    if differences and resume is None:
        shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ConfigError(
            f"training.output_dir {output_dir} holds a run with a different config (differs in {shown}); "
            f"pass --resume to continue it with this config, --overwrite to replace it, or choose another "
            f"training.output_dir"
        )
    latest = latest_checkpoint(checkpoints)
    if latest is None and resume == "latest":
        raise CheckpointError(f"--resume: {checkpoints} holds no checkpoint yet; drop --resume to start over")
    return OutputPlan(output_dir, latest, False, bool(differences))


def prepare_output(plan: OutputPlan, config: Config, resumed_step: int) -> None:
    """Main process only: clear (on --overwrite), create, write config.yaml, trim metrics to the resume step."""
    output_dir = plan.output_dir
    if plan.overwrite:
        for name in RUN_ARTIFACTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logger.info("--overwrite: removed the previous run's files from %s", output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete(output_dir / CHECKPOINTS_DIR)
    config_path = output_dir / CONFIG_FILE
    if plan.previous_config_differs and config_path.is_file():
        kept = output_dir / f"config.before_step_{resumed_step}.yaml"
        shutil.copyfile(config_path, kept)
        logger.warning("resuming with a changed config; the previous one is kept as %s", kept)
    temporary = output_dir / f".{CONFIG_FILE}.tmp"
    temporary.write_text(config.to_yaml(), encoding="utf-8")
    temporary.replace(config_path)
    truncate_metrics_after(output_dir / METRICS_FILE, resumed_step)
