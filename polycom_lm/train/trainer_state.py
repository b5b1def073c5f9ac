"""What the training loop itself needs to resume exactly, besides model and optimizer: the trainer state
(step, tokens, data position) as `trainer_state.json`, and every rank's RNG states as `rng/rank_R.pt`.

Both are written into a checkpoint folder next to the engine's model and optimizer state
(`polycom_lm.checkpoint.folders` handles the folders). Nothing is unpickled on load: JSON, and
`torch.load(weights_only=True)` of tensors and lists.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from polycom_lm.checkpoint.folders import STATE_FILE, write_text_atomically
from polycom_lm.errors import CheckpointError

logger = logging.getLogger(__name__)

RNG_FOLDER = "rng"


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
        """Parse and check a `trainer_state.json`: every field a non-negative integer (world size >= 1,
        skipped steps <= steps), else a one-line CheckpointError naming the file and field."""
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise CheckpointError(f"{culprit}: corrupt trainer state (not JSON: {error})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{culprit}: corrupt trainer state (not a JSON object)")
        values = {}
        for key in ("step", "tokens", "consumed_samples", "skipped_steps", "world_size"):
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CheckpointError(f"{culprit}: corrupt trainer state ({key!r} is {value!r}, not an integer)")
            minimum = 1 if key == "world_size" else 0
            if value < minimum:
                raise CheckpointError(f"{culprit}: corrupt trainer state ({key}={value}; it must be >= {minimum})")
            values[key] = value
        if values["skipped_steps"] > values["step"]:
            raise CheckpointError(
                f"{culprit}: corrupt trainer state (skipped_steps={values['skipped_steps']} exceeds step={values['step']})"
            )
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def read_trainer_state(directory: Path) -> TrainerState:
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {STATE_FILE})")
    return TrainerState.from_json(path.read_text(encoding="utf-8"), path)


def write_trainer_files(directory: Path, state: TrainerState, rank: int) -> None:
    """This rank's RNG states, and (rank 0) the trainer state, into checkpoint folder `directory`."""
    (directory / RNG_FOLDER).mkdir(exist_ok=True)
    torch.save(capture_rng_state(), directory / RNG_FOLDER / f"rank_{rank}.pt")
    if rank == 0:
        write_text_atomically(directory / STATE_FILE, state.to_json())


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


def load_rng_state(directory: Path, rank: int) -> Optional[dict]:
    """This rank's saved RNG states, or None when the checkpoint holds none for this rank."""
    path = directory / RNG_FOLDER / f"rank_{rank}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt RNG state ({type(error).__name__})") from None


def load_resume_rng(directory: Path, state: TrainerState, rank: int, world_size: int) -> Optional[dict]:
    """This rank's saved RNG states for a resume on `world_size` ranks, or None when the checkpoint was
    written by another world size (its streams cannot map one to one: `restore_rng_for_resume` reseeds).
    A checkpoint of this world size without this rank's file is incomplete: CheckpointError."""
    if state.world_size != world_size:
        return None
    rng = load_rng_state(directory, rank)
    if rng is None:
        raise CheckpointError(
            f"{directory / RNG_FOLDER / f'rank_{rank}.pt'} is missing: the checkpoint is incomplete (an exact resume "
            f"needs every rank's RNG state); restore the file or resume from another checkpoint"
        )
    return rng


def restore_rng_for_resume(rng: Optional[dict], state: TrainerState, rank: int, world_size: int, seed: int) -> None:
    """Restore `rng` (from `load_resume_rng`); call it last before training, so that nothing else draws
    from the restored streams in between. Without one (another world size wrote the checkpoint), each rank
    is reseeded deterministically from (seed, step, rank) and a warning says so."""
    if rng is not None:
        restore_rng_state(rng)
        return
    seed_everything(seed + 1_000_003 * state.step + rank)
    logger.warning("checkpoint written by %d rank(s), resuming on %d: RNG states reseeded, not restored",
                   state.world_size, world_size)
