"""The run's output folder: decide whether to start, resume or refuse, then make the folder ready.

`plan_output(config, resume, overwrite)` only reads; it raises a one-line `ConfigError` /
`CheckpointError` for every conflict, so a refused run leaves the folder exactly as it was.
`RunLock` keeps two runs out of one folder. `prepare_output(plan, config, step)` (main process only,
under the lock) then makes the folder ready, keeping the run's history one line:

- checkpoint saves a crash interrupted are finished or undone (`recover_interrupted_writes`);
- resuming from an earlier step than the newest checkpoint moves the later checkpoints and metrics rows
  into `retired/<time>-resumed-at-step_N/` (nothing is deleted), so that `latest`, the checkpoints and
  `metrics.jsonl` tell one story;
- rows logged after the resume step by a run that died before its next checkpoint are dropped (the
  resumed run reproduces them exactly).

`--overwrite` removes only what this project wrote into the folder, never other files a user keeps there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from polycom_lm.checkpoint.folders import (
    LATEST_FILE,
    RETIRED_DIR,
    latest_checkpoint,
    list_checkpoints,
    recover_interrupted_writes,
    retire_later_checkpoints,
    write_text_atomically,
)
from polycom_lm.config import Config, config_from_dict
from polycom_lm.errors import CheckpointError, ConfigError, PolycomError, first_line
from polycom_lm.train.callbacks.metrics_file import read_metrics, split_metrics_at
from polycom_lm.train.trainer_state import read_trainer_state

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".polycom_lm.lock"
# What a run writes into its folder, by top-level name: files, or folders with the glob patterns of their
# entries that the project (or wandb / TensorBoard / the profiler on its behalf) writes. --overwrite
# removes these entries and nothing else; a folder is removed only when nothing else is left in it.
RUN_FILES = ("config.yaml", "config.before_step_*.yaml", "metrics.jsonl", ".metrics.jsonl.tmp", "wandb_run_id")
TOKENIZER_DIR = "tokenizer"
RUN_FOLDERS = {
    CHECKPOINTS_DIR: ("step_*", ".tmp-step_*", ".stale-step_*", LATEST_FILE, f".{LATEST_FILE}.tmp-*"),
    TOKENIZER_DIR: ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    RETIRED_DIR: ("*-resumed-at-step_*",),
    "tensorboard": ("events.out.tfevents.*",),
    "wandb": ("offline-run-*", "run-*", "latest-run", "debug.log", "debug-internal.log", "debug-cli.*.log"),
    "profile": ("trace_rank*.json",),
}
# Keys that change how a run is watched, launched or where it lives, not what it computes.
OPERATIONAL_KEYS = (
    "logging.",
    "training.device",
    "training.profile_",
    "training.output_dir",
    "data.cache_dir",
    "data.preprocess_workers",
    "data.stream_workers",  # the stream's order does not depend on it
    "distributed.timeout_minutes",
    "distributed.timeout_seconds",
    "training.stop_signals",
    "training.time_limit",
    "training.stop_grace_seconds",
    "training.async_checkpoint",  # the same state, written in the background
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
    """Dotted keys whose values differ, ignoring operational keys (logging, device, paths, profiling)."""
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and not k.startswith(OPERATIONAL_KEYS)]


def read_saved_config(path: Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; a run folder's {CONFIG_FILE} is the run's resolved config")
    try:
        from polycom_lm.config.loading import safe_yaml_load

        raw = safe_yaml_load(path.read_text(encoding="utf-8"), str(path)) or {}
        return config_from_dict(raw)
    except (yaml.YAMLError, PolycomError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable polycom_lm config ({first_line(error)}); pass --overwrite to "
            f"replace the run in {path.parent}"
        ) from None


def _holds_run(output_dir: Path) -> bool:
    checkpoints = output_dir / CHECKPOINTS_DIR
    return (output_dir / CONFIG_FILE).exists() or (checkpoints / LATEST_FILE).exists() or bool(
        list_checkpoints(checkpoints)
    )


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
    saved_config_path = output_dir / CONFIG_FILE
    saved = read_saved_config(saved_config_path) if saved_config_path.exists() else None
    if resume not in (None, "latest"):
        explicit = Path(resume)
        read_trainer_state(explicit)  # a one-line CheckpointError when it is not a checkpoint
        if _holds_run(output_dir) and explicit.resolve().parent != checkpoints.resolve():
            raise ConfigError(
                f"--resume {explicit}: training.output_dir {output_dir} already holds another run; continue "
                f"into a new training.output_dir (or resume from one of {checkpoints}'s own checkpoints)"
            )
        _check_metrics_file(output_dir, holds_run=_holds_run(output_dir))
        differs = bool(saved is not None and config_differences(saved, config))
        return OutputPlan(output_dir, explicit, False, differs)
    if not _holds_run(output_dir):
        if resume == "latest":
            raise CheckpointError(f"--resume: {output_dir} holds no run to resume; drop --resume to start one")
        _check_metrics_file(output_dir, holds_run=False)
        return OutputPlan(output_dir, None, False, False)
    _check_metrics_file(output_dir, holds_run=True)
    differences = config_differences(saved, config) if saved is not None else []
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


def _check_metrics_file(output_dir: Path, holds_run: bool) -> None:
    """A metrics.jsonl that is not a run's (no run beside it) is somebody's file: never empty it. A run's
    own file must be readable (read_metrics raises a one-line error naming a bad line)."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return
    if not holds_run:
        raise ConfigError(
            f"training.output_dir {output_dir} holds a {METRICS_FILE} but no polycom_lm run (no {CONFIG_FILE} or "
            f"checkpoints); choose another training.output_dir or move that file away"
        )
    read_metrics(path)


class RunLock:
    """An exclusive lock on a run folder for one training run (main process), so a second run in the same
    folder fails at start instead of both writing. `flock` is released by the kernel when its holder
    dies, so a lock left by a killed run is taken over; the file names the holder for the error."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                described = json.loads(holder)
                who = f"host {described['host']}, PID {described['pid']}, since {described['since']}"
            except (ValueError, KeyError, TypeError):
                who = "an unknown process"
            raise ConfigError(
                f"training.output_dir {self.path.parent} is in use by another run ({who}); wait for it to "
                f"finish, stop it, or choose another training.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def remove_run_artifacts(output_dir: Path) -> list[Path]:
    """Delete what this project wrote into `output_dir` (see RUN_FILES / RUN_FOLDERS); returns what was
    removed. Other files, and folders that still hold them, stay."""
    removed: list[Path] = []
    for pattern in RUN_FILES:
        for path in output_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    for folder_name, patterns in RUN_FOLDERS.items():
        folder = output_dir / folder_name
        if not folder.is_dir() or folder.is_symlink():
            continue
        for pattern in patterns:
            for path in folder.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def prepare_output(plan: OutputPlan, config: Config, resumed_step: int, tokenizer: Optional[Any] = None) -> None:
    """Main process only, under the run lock: clear (on --overwrite), repair, create, write config.yaml,
    keep the history one line (see the module docstring), and keep a copy of the run's `tokenizer` in
    `tokenizer/` so that eval, export and generate find it wherever the run folder goes."""
    output_dir = plan.output_dir
    if plan.overwrite:
        removed = remove_run_artifacts(output_dir)
        logger.info("--overwrite: removed %d entries the previous run wrote in %s", len(removed), output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = output_dir / CHECKPOINTS_DIR
    recover_interrupted_writes(checkpoints)
    _retire_history_after(output_dir, resumed_step)
    config_path = output_dir / CONFIG_FILE
    if plan.previous_config_differs and config_path.is_file():
        kept = output_dir / f"config.before_step_{resumed_step}.yaml"
        shutil.copyfile(config_path, kept)
        logger.warning("resuming with a changed config; the previous one is kept as %s", kept)
    write_text_atomically(config_path, config.to_yaml())
    if tokenizer is not None and not (output_dir / TOKENIZER_DIR).is_dir():
        from polycom_lm.data.tokenizer import copy_tokenizer

        temporary = output_dir / f".{TOKENIZER_DIR}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        copy_tokenizer(tokenizer, temporary)
        os.replace(temporary, output_dir / TOKENIZER_DIR)


def _retire_history_after(output_dir: Path, step: int) -> None:
    """Resuming at `step`: later checkpoints and their metrics rows move to `retired/` (a resume from an
    earlier checkpoint abandons them); rows after `step` with no checkpoint behind them (a crash) are
    dropped, since the resumed run reproduces them."""
    checkpoints = output_dir / CHECKPOINTS_DIR
    metrics = output_dir / METRICS_FILE
    later = [path for number, path in list_checkpoints(checkpoints) if number > step]
    kept, after = split_metrics_at(metrics, step) if metrics.is_file() else ([], [])
    if later:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        retired = output_dir / RETIRED_DIR / f"{stamp}-resumed-at-step_{step}"
        moved = retire_later_checkpoints(checkpoints, step, retired / CHECKPOINTS_DIR)
        if after:
            (retired / METRICS_FILE).write_text("".join(after), encoding="utf-8")
        logger.warning("resuming at step %d: moved %s and %d later metrics rows to %s",
                       step, ", ".join(path.name for path in moved), len(after), retired)
    if (checkpoints / f"step_{step}").is_dir():
        write_text_atomically(checkpoints / LATEST_FILE, f"step_{step}\n")
    if metrics.is_file() and (after or "".join(kept).encode("utf-8") != metrics.read_bytes()):
        write_text_atomically(metrics, "".join(kept))  # also drops a torn last line of a killed writer
