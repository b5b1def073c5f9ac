"""Weights & Biases logging (main process only).

Project / entity / group / run name / tags come from `logging.*`; the group defaults to the experiment
name and the tags always include the activation. Mode `offline` (default) writes under the run's output
folder for a later `wandb sync`; `online` needs the user's own login; `disabled` does nothing. Only the
resolved config and metrics are sent: never environment variables or other secrets.
"""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from typing import Any

from polycom_lm.config import Config
from polycom_lm.train.loop import Callback, Trainer

logger = logging.getLogger(__name__)


def wandb_settings(config: Config, output_dir: Path) -> dict[str, Any]:
    """Arguments for `wandb.init` (separate so that tests can check them without starting wandb)."""
    logging_config = config.logging
    tags = list(dict.fromkeys([*logging_config.wandb_tags, config.model.activation, config.model.family]))
    return {
        "project": logging_config.wandb_project,
        "entity": logging_config.wandb_entity,
        "group": logging_config.wandb_group or config.experiment,
        "name": logging_config.wandb_run_name or output_dir.name,
        "tags": tags,
        "mode": logging_config.wandb_mode,
        "dir": str(output_dir),
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
        self._run = wandb.init(**settings)
        logger.info("wandb %s run %s (project %s, group %s)", settings["mode"], settings["id"],
                    settings["project"], settings["group"])

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
