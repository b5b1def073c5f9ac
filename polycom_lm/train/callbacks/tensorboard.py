"""TensorBoard event files under `<output_dir>/tensorboard` (main process only; `logging.tensorboard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polycom_lm.train.loop import Callback, Trainer


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=trainer.state.step + 1)

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("step", "kind"):
                self._writer.add_scalar(f"train/{key}", value, row["step"])

    def on_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._writer.add_scalar(f"eval/{row['name']}/loss", row["loss"], row["step"])
            self._writer.add_scalar(f"eval/{row['name']}/perplexity", row["perplexity"], row["step"])

    def on_downstream_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._writer.add_scalar(f"downstream/{row['task']}/{row['metric']}", row["value"], row["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
