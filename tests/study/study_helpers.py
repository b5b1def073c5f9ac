"""Helpers for the study tests: a base config on the tiny model and study files around it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from trainer_test_helpers import run_config


def write_study(folder: Path, prepared_data: dict[str, Path], grid: dict[str, list], *, name: str = "toy",
                training: Optional[dict[str, Any]] = None, **study: Any) -> Path:
    """A base config (tiny model, the session's test corpus) and a study file over it in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    base = run_config(prepared_data, folder / "unused", **{"max_steps": 4, "save_every_steps": 2, **(training or {})})
    (folder / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    content = {"name": name, "base": "base.yaml", "output_dir": str(folder / "out"), "grid": grid, **study}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def write_metrics(run_dir: Path, rows: list[dict[str, Any]], config: Optional[dict[str, Any]] = None) -> None:
    """A fake finished run folder: config.yaml (resolved from `config`) and metrics.jsonl with `rows`."""
    from polycom_lm.config import config_from_dict

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = config_from_dict(config or {})
    (run_dir / "config.yaml").write_text(resolved.to_yaml(), encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def spawn_in_process(launched: list):
    """A stand-in for `runner._spawn([python, -m, polycom_lm.cli, train, ...])`: `cli([train, ...])` in this
    process, returning a process that has already ended; each run's config path is appended to `launched`."""
    from polycom_lm.cli import main as cli

    class Ended:
        def __init__(self, returncode: int):
            self.returncode = returncode

        def poll(self) -> int:
            return self.returncode

        def send_signal(self, number: int) -> None:
            pass

    def train(command, log, environment):
        assert command[:3] == [sys.executable, "-m", "polycom_lm.cli"] and command[3] == "train", command
        launched.append(command[4])
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return Ended(cli(command[3:]))

    return train
