"""Checkpoint folders of a run: atomic writes, the `latest` pointer, retention and clean-up.

Layout of a run's output folder:

    checkpoints/
      step_N/
        ...                     the engine's model + optimizer state (DCP `.metadata` + `*.distcp`, or
                                DeepSpeed's `deepspeed/`), and what the trainer adds beside it
                                (`trainer_state.json`, `rng/rank_R.pt`; see `polycom_lm.train.trainer_state`)
      latest                    a text file naming the newest complete step_N

A checkpoint is written into `checkpoints/.tmp-step_N`, renamed to `step_N` when every rank has finished,
and only then is `latest` replaced (write to a temporary file, `os.replace`). A crash at any point leaves
the previous checkpoint and pointer intact. A folder is complete when it holds `trainer_state.json`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from polycom_lm.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_PATTERN = re.compile(r"^step_(\d+)$")


def step_directory(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"step_{step}"


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a trainer state), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = _STEP_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` points to, or None when the run has no checkpoint yet."""
    pointer = checkpoints_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    target = checkpoints_dir / name
    if not _STEP_PATTERN.match(name) or not (target / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {checkpoints_dir}")
    return target


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    write_contents: Callable[[Path], None],
    *,
    rank: int,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `step_{step}` atomically on every rank; returns its final path.

    Every rank calls this; `write_contents(folder)` writes this rank's part (engine shards, RNG states; the
    trainer state on rank 0) into the temporary folder, and rank 0 finishes (rename, pointer, retention).
    """
    final = step_directory(checkpoints_dir, step)
    temporary = checkpoints_dir / f".tmp-step_{step}"
    if rank == 0:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)  # left over from a crash while writing this same step
        temporary.mkdir(parents=True)
    barrier()
    write_contents(temporary)
    barrier()
    if rank == 0:
        if final.exists():
            # Re-saving a step (e.g. after resuming from it): move the old one aside first, then drop it.
            stale = checkpoints_dir / f".stale-step_{step}"
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
            os.replace(temporary, final)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, final)
        write_text_atomically(checkpoints_dir / LATEST_FILE, final.name + "\n")
        # Keep this one and the keep_last - 1 newest before it. Checkpoints of later steps exist only after a
        # resume from an earlier one; they are left alone (and replaced when this run reaches their step).
        older = [path for number, path in list_checkpoints(checkpoints_dir) if number < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def remove_incomplete(checkpoints_dir: Path) -> None:
    """Delete folders of checkpoint writes that a crash interrupted (never a complete checkpoint)."""
    if not checkpoints_dir.is_dir():
        return
    for child in checkpoints_dir.iterdir():
        if child.is_dir() and child.name.startswith((".tmp-step_", ".stale-step_")):
            shutil.rmtree(child, ignore_errors=True)
            logger.info("removed the incomplete checkpoint write %s", child)
