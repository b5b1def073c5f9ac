"""What the training loop itself needs to resume exactly, besides model and optimizer: the trainer state
(step, tokens, data position) as `trainer_state.json`, and every rank's RNG states as `rng/rank_R.pt`.

Both are written into a checkpoint folder next to the engine's model and optimizer state
(`polycom_lm.checkpoint.folders` handles the folders). Nothing is unpickled on load: JSON, and
`torch.load(weights_only=True)` of tensors and lists.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from polycom_lm.checkpoint.folders import STATE_FILE, write_text_atomically
from polycom_lm.errors import CheckpointError

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
        try:
            raw = json.loads(text)
            return cls(**{key: int(raw[key]) for key in ("step", "tokens", "consumed_samples", "skipped_steps", "world_size")})
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{culprit}: corrupt trainer state ({type(error).__name__}: {error})") from None

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
    """This rank's saved RNG states, or None when the checkpoint was written by fewer ranks."""
    path = directory / RNG_FOLDER / f"rank_{rank}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: corrupt RNG state ({type(error).__name__})") from None
