"""Weights & Biases logging (main process only).

Who decides each `wandb.init` setting, first match wins:
1. the config key, when the config sets it (`logging.wandb_mode`, `wandb_project`, `wandb_entity`,
   `wandb_group`, `wandb_run_name`, `wandb_tags`, `wandb_dir`);
2. wandb's own environment variable (`WANDB_MODE`, `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_RUN_GROUP`,
   `WANDB_NAME`, `WANDB_TAGS`, `WANDB_DIR`): the setting is left to wandb, which reads it;
3. our default: mode `offline` (written under the run's folder for a later `wandb sync`), project
   `polycom_lm`, group the experiment name, run name the output folder's name, files in the output folder.
The activation and model family are always added to the tags. Only the resolved config and metrics are
sent: never environment variables or other secrets.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any, Mapping, Optional

from polycom_lm.config import Config, LoggingConfig
from polycom_lm.train.loop import Callback, Trainer

logger = logging.getLogger(__name__)

DEFAULT_MODE = "offline"
DEFAULT_PROJECT = "polycom_lm"
# The values of WANDB_MODE that wandb accepts, as the mode they mean.
_ENVIRONMENT_MODES = {"online": "online", "run": "online", "shared": "online", "offline": "offline",
                      "dryrun": "offline", "disabled": "disabled"}


def _environment(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _decide(configured: Any, variable: str, default: Any, environ: Mapping[str, str]) -> Any:
    """The config's value if set; None (wandb reads `variable` itself) if the environment sets it; else ours."""
    if configured is not None:
        return configured
    if environ.get(variable, "").strip():
        return None
    return default


def wandb_mode(logging_config: LoggingConfig, environ: Optional[Mapping[str, str]] = None) -> str:
    """The mode wandb will run in: online, offline or disabled (see the module docstring)."""
    if logging_config.wandb_mode is not None:
        return logging_config.wandb_mode
    value = _environment(environ).get("WANDB_MODE", "").strip().lower()
    return _ENVIRONMENT_MODES.get(value, DEFAULT_MODE if not value else value)


def wandb_settings(config: Config, output_dir: Path, environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Arguments for `wandb.init` (separate so that tests can check them without starting wandb). A None
    value leaves that setting to wandb's environment variable."""
    environ = _environment(environ)
    settings = config.logging
    tags = settings.wandb_tags
    if tags is None:
        tags = [tag.strip() for tag in environ.get("WANDB_TAGS", "").split(",") if tag.strip()]
    return {
        "project": _decide(settings.wandb_project, "WANDB_PROJECT", DEFAULT_PROJECT, environ),
        "entity": settings.wandb_entity,  # None: WANDB_ENTITY, else the account's default entity
        "group": _decide(settings.wandb_group, "WANDB_RUN_GROUP", config.experiment, environ),
        "name": _decide(settings.wandb_run_name, "WANDB_NAME", output_dir.name, environ),
        # wandb.init's tags replace WANDB_TAGS, so the environment's tags are read here to keep them.
        "tags": list(dict.fromkeys([*tags, config.model.activation, config.model.family])),
        "mode": _decide(settings.wandb_mode, "WANDB_MODE", DEFAULT_MODE, environ),
        "dir": _decide(settings.wandb_dir, "WANDB_DIR", str(output_dir), environ),
        "config": config.to_dict(),
        "resume": "allow",
        "id": None,
    }


class WandbCallback(Callback):
    def __init__(self, config: Config, output_dir: Path):
        self.config = config
        self.output_dir = Path(output_dir)
        self._run = None

    def on_train_start(self, trainer: Trainer) -> None:
        import wandb

        settings = wandb_settings(self.config, self.output_dir)
        # A stable id per output folder, so a resumed run continues the same wandb run.
        id_file = self.output_dir / "wandb_run_id"
        if id_file.is_file():
            settings["id"] = id_file.read_text(encoding="utf-8").strip()
        else:
            settings["id"] = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(settings["id"] + "\n", encoding="utf-8")
        # wandb writes into a temporary folder instead when its folder is missing (before 0.18 silently).
        directory = settings["dir"] or os.environ.get("WANDB_DIR", "").strip()
        if directory:
            Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(**settings)
        logger.info("wandb %s run %s (project %s, group %s)", wandb_mode(self.config.logging), settings["id"],
                    self._run.project, self._run.group)

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({f"train/{k}": v for k, v in row.items() if k not in ("kind", "step")}, step=row["step"])

    def on_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if self._run is None:
            return
        metrics = {}
        for row in rows:
            metrics[f"eval/{row['name']}/loss"] = row["loss"]
            metrics[f"eval/{row['name']}/perplexity"] = row["perplexity"]
        self._run.log(metrics, step=trainer.state.step)

    def on_downstream_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if self._run is not None:
            self._run.log({f"downstream/{row['task']}/{row['metric']}": row["value"] for row in rows},
                          step=trainer.state.step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
