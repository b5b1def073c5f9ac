"""Checkpoint folders of a run: atomic writes, the `latest` pointer, retention and clean-up.

Layout of a run's output folder:

    checkpoints/
      step_N/
        ...                     the engine's model + optimizer state (DCP `.metadata` + `*.distcp`, or
                                DeepSpeed's `deepspeed/`), and what the trainer adds beside it
                                (`trainer_state.json`, `rng/rank_R.pt`; see `polycom_lm.train.trainer_state`)
      latest                    a text file naming the newest complete step_N

A checkpoint is written into `checkpoints/.tmp-step_N`; when every rank has finished, rank 0 marks it
complete (`.complete`), renames it to `step_N` and only then replaces `latest` (a temporary file and
`os.replace`). Re-saving an existing step moves the old folder aside (`.stale-step_N`) for the one rename
in between. A crash at any moment leaves a state that `recover_interrupted_writes` turns back into a
consistent one on the next start: a complete `.tmp-step_N` is renamed into place, a `.stale-step_N` whose
replacement never arrived goes back, incomplete writes are deleted. `latest` missing or naming nothing
falls back to the newest complete checkpoint (with a warning). A folder is complete when it holds
`trainer_state.json`.

`retire_later_checkpoints` moves the checkpoints after a step aside (into `retired/`), for a run that
resumes from an earlier step: the run's history stays one line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from polycom_lm.errors import CheckpointError
from polycom_lm import faults

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
COMPLETE_MARKER = ".complete"
RETIRED_DIR = "retired"
_STEP_PATTERN = re.compile(r"^step_(\d+)$")
_TEMPORARY = ".tmp-step_"
_STALE = ".stale-step_"


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


def _interrupted_save(checkpoints_dir: Path, step: int) -> Optional[Path]:
    """Where a complete checkpoint of `step` sits when a crash interrupted its save or re-save before the
    rename into `step_N` (what `recover_interrupted_writes` will rename into place), else None."""
    temporary = checkpoints_dir / f"{_TEMPORARY}{step}"
    if (temporary / COMPLETE_MARKER).is_file() and (temporary / STATE_FILE).is_file():
        return temporary
    stale = checkpoints_dir / f"{_STALE}{step}"
    return stale if (stale / STATE_FILE).is_file() else None


def _interrupted_saves(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if checkpoints_dir.is_dir():
        for child in checkpoints_dir.iterdir():
            for prefix in (_TEMPORARY, _STALE):
                number = child.name[len(prefix):]
                if child.name.startswith(prefix) and number.isdigit() and not step_directory(checkpoints_dir, int(number)).exists():
                    if _interrupted_save(checkpoints_dir, int(number)) == child:
                        found.append((int(number), child))
    return found


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None when the run has no checkpoint yet. Reads only.

    Normally the folder `latest` names. A crash can leave that folder under its temporary or stale name
    (killed inside a save); that folder is returned, and `recover_interrupted_writes` renames it later.
    Without a readable `latest` (killed during the first pointer write) the newest complete checkpoint is
    used. A pointer that names nothing resumable is an error that lists the complete checkpoints."""
    pointer = checkpoints_dir / LATEST_FILE
    candidates = sorted(list_checkpoints(checkpoints_dir) + _interrupted_saves(checkpoints_dir))
    if not pointer.exists():
        if candidates:
            logger.warning("%s is missing; resuming from the newest complete checkpoint %s", pointer, candidates[-1][1])
            return candidates[-1][1]
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError) as error:
        hint = (f"delete it to resume from the newest complete checkpoint ({candidates[-1][1].name})"
                if candidates else "delete it")
        raise CheckpointError(f"{pointer} is not a text file naming a checkpoint ({type(error).__name__}); {hint}") from None
    match = _STEP_PATTERN.match(name)
    if match:
        step = int(match.group(1))
        target = checkpoints_dir / name
        newer = sorted((number, path) for number, path in _interrupted_saves(checkpoints_dir) if number > step)
        if newer:  # a later save completed but was killed before its rename and the pointer update
            logger.warning("resuming from %s, saved after %s but interrupted before its rename", newer[-1][1], name)
            return newer[-1][1]
        if (target / STATE_FILE).is_file():
            return target
        interrupted = _interrupted_save(checkpoints_dir, step)
        if interrupted is not None:
            logger.warning("%s names %s, whose save was interrupted; resuming from %s", pointer, name, interrupted)
            return interrupted
    shown = name if len(name) <= 80 and name.isprintable() else repr(name[:77]) + "..."
    available = ", ".join(path.name for _, path in candidates) or "none"
    raise CheckpointError(
        f"{pointer} names {shown!r}, which is not a complete checkpoint in {checkpoints_dir} "
        f"(complete ones: {available}); point it at one of them or delete it"
    )


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The checkpoint folder of run `run_dir` at `step`, or the one to resume from (`latest_checkpoint`)
    when `step` is None; a one-line CheckpointError naming the available steps otherwise."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    if step is None:
        latest = latest_checkpoint(checkpoints)
        if latest is None:
            raise CheckpointError(f"{run_dir}: no checkpoint yet (no checkpoints/{LATEST_FILE})")
        return latest
    directory = step_directory(checkpoints, step)
    if not directory.is_dir():
        available = ", ".join(str(number) for number, _ in list_checkpoints(checkpoints)) or "none"
        raise CheckpointError(f"{run_dir}: no checkpoint for step {step}; available steps: {available}")
    return directory


def write_text_atomically(path: Path, text: str, crash_point: Optional[str] = None) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if crash_point:
        faults.crash_point(crash_point)
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
    temporary = begin_checkpoint(checkpoints_dir, step, rank=rank, barrier=barrier)
    write_contents(temporary)
    return finish_checkpoint(checkpoints_dir, step, rank=rank, barrier=barrier, keep_last=keep_last)


def begin_checkpoint(checkpoints_dir: Path, step: int, *, rank: int, barrier: Callable[[], None]) -> Path:
    """Every rank: the empty temporary folder of checkpoint `step` (rank 0 creates it), ready to write into."""
    temporary = checkpoints_dir / f"{_TEMPORARY}{step}"
    if rank == 0:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)  # left over from a crash while writing this same step
        temporary.mkdir(parents=True)
    barrier()
    return temporary


def finish_checkpoint(checkpoints_dir: Path, step: int, *, rank: int, barrier: Callable[[], None], keep_last: int) -> Path:
    """Every rank, once its part is written: rank 0 marks the folder complete, renames it into place, moves
    `latest` and applies retention; returns the final path. (`barrier` may be a checkpoint thread's own
    group: nothing here touches the training's collectives.)"""
    final = step_directory(checkpoints_dir, step)
    temporary = checkpoints_dir / f"{_TEMPORARY}{step}"
    barrier()
    if rank == 0:
        write_text_atomically(temporary / COMPLETE_MARKER, f"{step}\n")
        faults.crash_point(f"complete@{step}")
        if final.exists():
            # Re-saving a step (e.g. after resuming from it): move the old one aside first, then drop it.
            # A crash between the two renames is repaired by `recover_interrupted_writes`.
            stale = checkpoints_dir / f"{_STALE}{step}"
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
            faults.crash_point(f"between-renames@{step}")
            os.replace(temporary, final)
            shutil.rmtree(stale)
        else:
            os.replace(temporary, final)
        write_text_atomically(checkpoints_dir / LATEST_FILE, final.name + "\n", crash_point=f"latest@{step}")
        # Keep this one and the keep_last - 1 newest before it. Checkpoints of later steps exist only after a
        # resume from an earlier one; they are left alone (and replaced when this run reaches their step).
        older = [path for number, path in list_checkpoints(checkpoints_dir) if number < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier()
    return final


def recover_interrupted_writes(checkpoints_dir: Path) -> None:
    """Bring a checkpoints folder that a crash interrupted back to a consistent state (main process only,
    before anything reads it): finish a complete write, undo a half-done re-save, delete the rest."""
    if not checkpoints_dir.is_dir():
        return
    for child in sorted(checkpoints_dir.iterdir()):
        name = child.name
        if name.startswith(_TEMPORARY) and child.is_dir():
            final = checkpoints_dir / f"step_{name[len(_TEMPORARY):]}"
            if (child / COMPLETE_MARKER).is_file() and (child / STATE_FILE).is_file() and not final.exists():
                os.replace(child, final)  # killed between marking it complete and the rename
                logger.warning("recovered the complete checkpoint %s from an interrupted save", final)
            else:
                shutil.rmtree(child, ignore_errors=True)
                logger.info("removed the incomplete checkpoint write %s", child)
    for child in sorted(checkpoints_dir.iterdir()):
        name = child.name
        if name.startswith(_STALE) and child.is_dir():
            final = checkpoints_dir / f"step_{name[len(_STALE):]}"
            if final.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, final)  # its replacement never arrived: the old one is still the step
                logger.warning("restored %s, whose re-save was interrupted", final)
        elif name.startswith(f".{LATEST_FILE}.tmp-") and child.is_file():
            child.unlink(missing_ok=True)


def retire_later_checkpoints(checkpoints_dir: Path, step: int, into: Path) -> list[Path]:
    """Move every complete checkpoint after `step` into `into` (created), keeping their names; returns the
    moved folders. Used when a run resumes from `step` and so abandons what came after it."""
    later = [path for number, path in list_checkpoints(checkpoints_dir) if number > step]
    if later:
        into.mkdir(parents=True, exist_ok=True)
        for path in later:
            os.replace(path, into / path.name)
    return [into / path.name for path in later]
