"""The training data's position in a checkpoint, for datasets that keep one (`StreamingDataset`): each
rank's `dataset.state_dict()` as `data/rank_R.json` in the checkpoint folder, next to `trainer_state.json`.
A `PackedDataset` keeps none (its position is the trainer's `consumed_samples`), so nothing is written.
JSON only: nothing in a checkpoint is ever unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from polycom_lm.errors import CheckpointError

logger = logging.getLogger(__name__)

DATA_FOLDER = "data"


def data_position_file(checkpoint: Path, rank: int) -> Path:
    return Path(checkpoint) / DATA_FOLDER / f"rank_{rank}.json"


def save_data_position(checkpoint: Path, dataset: Any, rank: int) -> None:
    """Write this rank's data position into the checkpoint folder being written (every rank calls this)."""
    state = dataset.state_dict()
    if not state:
        return
    path = data_position_file(checkpoint, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def load_data_position(checkpoint: Path, dataset: Any, rank: int) -> None:
    """Restore this rank's data position from `checkpoint`, if the dataset keeps one and it was saved."""
    if not dataset.state_dict():
        return  # the trainer's consumed_samples is the whole position
    path = data_position_file(checkpoint, rank)
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("rank_*.json")) if path.parent.is_dir() else []
        if others:
            raise CheckpointError(f"{checkpoint} holds the streamed data positions of {len(others)} rank(s) but "
                                  f"none for rank {rank}; resume a streaming run on the same number of ranks")
        logger.warning("%s holds no streamed data position (written without streaming?)", checkpoint)
        return
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{path}: corrupt data position ({error})") from None
    dataset.load_state_dict(state)
