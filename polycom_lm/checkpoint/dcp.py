"""Saving and loading state dicts with `torch.distributed.checkpoint` (DCP): the one place that calls
`dcp.save` / `dcp.load`, with one error policy.

Every failure to load (a missing or crafted `.metadata`, a truncated shard, a refused pickle, a per-rank
failure that DCP wraps in its `CheckpointException`, which derives from `BaseException`) becomes a one-line
`CheckpointError` naming the folder and the root cause. Loading never unpickles anything but tensors,
builtins and DCP's metadata classes (`safe_load.py`).
"""

from __future__ import annotations

import pickle
from concurrent.futures import Future
import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from polycom_lm.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, load_dcp_metadata, refused_global
from polycom_lm.errors import CheckpointError, first_line

METADATA_FILE = ".metadata"
# One process: DCP warns that it "assumes the intent is to save in a single process". It is. (Filtered
# for the whole process: an asynchronous save writes from a thread, where a local filter would not hold.)
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def is_dcp_checkpoint(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def read_dcp_metadata(directory: Path) -> Metadata:
    """The checkpoint's metadata (keys, shapes, dtypes), read safely; CheckpointError if there is none."""
    if not is_dcp_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a model/optimizer checkpoint (no DCP {METADATA_FILE} file)")
    return load_dcp_metadata(Path(directory) / METADATA_FILE)


def save_dcp(directory: Path, state: dict[str, Any], *, distributed: bool) -> None:
    """Write `state` (nested dicts of tensors / DTensors and plain values) into `directory`."""
    dcp.save(state, checkpoint_id=str(directory), no_dist=not distributed)


def save_dcp_async(directory: Path, state: dict[str, Any], *, distributed: bool, group: Any) -> Future:
    """Stage `state` into CPU memory (every tensor copied before this returns), then write it into
    `directory` in a background thread whose collectives run on `group`; returns the write's future."""
    return dcp.async_save(state, checkpoint_id=str(directory), process_group=group, no_dist=not distributed)


def load_dcp(directory: Path, state: dict[str, Any], *, distributed: bool) -> None:
    """Fill `state` in place from `directory` (resharding to the placements of its DTensors)."""
    read_dcp_metadata(directory)  # a missing or crafted metadata file: one line, before any collective
    try:
        dcp.load(
            state,
            storage_reader=SafeFileSystemReader(str(directory)),
            planner=SafeLoadPlanner(),
            no_dist=not distributed,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001  CheckpointException derives from BaseException
        raise CheckpointError(f"{directory}: cannot load model/optimizer state ({root_cause(error)})") from None


def root_cause(error: BaseException) -> str:
    """One line naming what went wrong, looking inside DCP's per-rank `CheckpointException`."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))
        if isinstance(error, tuple):  # (exception, traceback) in some torch versions
            error = error[0]
    if isinstance(error, CheckpointError):
        return str(error)
    if isinstance(error, pickle.UnpicklingError):
        return f"refusing to unpickle a stored item ({refused_global(error)})"
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
