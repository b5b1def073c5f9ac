"""Checkpoint directories: atomic writes, the `latest` pointer, retention, trainer state and RNG states.

Layout of a run's output folder:

    checkpoints/
      step_N/
        .metadata, *.distcp     the engine's model + optimizer state (DCP for ddp / fsdp)
        rng/rank_R.pt           every rank's RNG states (tensors and lists only; loaded weights_only)
        trainer_state.json      step, tokens, consumed samples, skipped steps, world size
      latest                    a text file naming the newest complete step_N

A checkpoint is written into `checkpoints/.tmp-step_N`, renamed to `step_N` when every rank has finished,
and only then is `latest` replaced (write to a temporary file, `os.replace`). A crash at any point leaves
the previous checkpoint and pointer intact. Nothing is ever unpickled: JSON and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from polycom_lm.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_PATTERN = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Everything besides model and optimizer that an exact resume needs (the sampler state is one integer)."""

    step: int = 0  # optimizer updates made (skipped non-finite steps included)
    tokens: int = 0  # training tokens consumed
    consumed_samples: int = 0  # global samples consumed: the whole data-loader position
    skipped_steps: int = 0  # updates dropped because the loss or gradient norm was not finite
    world_size: int = 1

    @classmethod
    def from_json(cls, text: str, culprit: Path) -> "TrainerState":
        try:
            raw = json.loads(text)
            return cls(**{key: int(raw[key]) for key in ("step", "tokens", "consumed_samples", "skipped_steps", "world_size")})
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{culprit}: corrupt trainer state ({type(error).__name__}: {error})") from None


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- directories


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


def read_trainer_state(directory: Path) -> TrainerState:
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {STATE_FILE})")
    return TrainerState.from_json(path.read_text(encoding="utf-8"), path)


def save_checkpoint(
    checkpoints_dir: Path,
    state: TrainerState,
    save_engine_state: Callable[[Path], None],
    *,
    rank: int,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `step_{state.step}` atomically on every rank; returns its final path.

    Every rank calls this; the engine writes its shards into the temporary folder, each rank writes its RNG
    states, and rank 0 finishes (trainer state, rename, pointer, retention).
    """
    final = step_directory(checkpoints_dir, state.step)
    temporary = checkpoints_dir / f".tmp-step_{state.step}"
    if rank == 0:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)  # left over from a crash while writing this same step
        (temporary / "rng").mkdir(parents=True)
    barrier()
    save_engine_state(temporary)
    torch.save(capture_rng_state(), temporary / "rng" / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        write_text_atomically(temporary / STATE_FILE, json.dumps(asdict(state), indent=2) + "\n")
        if final.exists():
            # Re-saving a step (e.g. after resuming from it): move the old one aside first, then drop it.
            stale = checkpoints_dir / f".stale-step_{state.step}"
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
        older = [path for step, path in list_checkpoints(checkpoints_dir) if step < state.step]
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


def load_rng_state(directory: Path, rank: int) -> Optional[dict]:
    """This rank's saved RNG states, or None when the checkpoint was written by fewer ranks."""
    path = directory / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt RNG state ({type(error).__name__})") from None
