"""`metrics.jsonl`: one JSON object per logged training step and per evaluation (main process only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from polycom_lm.train.loop import Callback, Trainer


def _finite_or_string(value: Any) -> Any:
    # JSON has no NaN / Infinity; keep them readable (and parseable) as strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsFileCallback(Callback):
    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        assert self._handle is not None
        self._handle.write(json.dumps({k: _finite_or_string(v) for k, v in row.items()}) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.write(row)

    def on_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def on_downstream_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file (a torn last line from a killed process is ignored)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics_after(path: Path, step: int) -> None:
    """Drop rows logged after `step` (by a run that died before its next checkpoint); atomic rewrite.

    A resumed run reproduces those rows exactly, so keeping them would only duplicate steps.
    """
    if not Path(path).is_file():
        return
    kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= step]
    temporary = Path(path).with_name(f".{Path(path).name}.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(temporary, path)
