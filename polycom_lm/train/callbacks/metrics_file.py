"""`metrics.jsonl`: one JSON object per logged training step and per evaluation (main process only)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from polycom_lm.errors import CheckpointError
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


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(raw line with its newline, row) for every row of a metrics file. A torn last line (a killed
    writer) is left out; any other line that is not a JSON object with an integer `step` is a one-line
    CheckpointError naming the file and line, since it is not what this project wrote."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    parsed = []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
            row = json.loads(text)
            valid = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
        except (UnicodeDecodeError, ValueError):
            valid, row, text = False, None, ""
        if valid:
            parsed.append((text if text.endswith("\n") else text + "\n", row))
        elif number == len(lines) and not raw.endswith(b"\n"):
            continue  # the last write of a killed process
        elif raw.strip():
            raise CheckpointError(
                f"{path} line {number} is not a metrics row (a JSON object with an integer 'step'); fix or "
                f"delete that line, or pass --overwrite to start the run over"
            )
    return parsed


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file (see `_parsed_lines` for what is refused)."""
    return [row for _, row in _parsed_lines(path)]


def split_metrics_at(path: Path, step: int) -> tuple[list[str], list[str]]:
    """The raw lines of rows logged at or before `step`, and those after it."""
    kept, after = [], []
    for text, row in _parsed_lines(path):
        (kept if row["step"] <= step else after).append(text)
    return kept, after
