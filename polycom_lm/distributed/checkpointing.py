"""Model + optimizer checkpoints through `torch.distributed.checkpoint` (DCP) for sharded engines.

The layout is the one the `ddp` engine writes — `{"model": ..., "optimizer": ...}` with fully qualified
parameter names — so a checkpoint saved by `fsdp` (with or without tensor parallelism) resumes under
`ddp` on one process and the reverse. DCP stores the global (unsharded) tensors with each shard's offset,
so it reshards on load to any world size or TP degree.

The one layout that is not the plain global tensor is the interleaved `[gate_r | up_r]` storage of a
gated in-proj under tensor parallelism (see `tensor_parallel.py`). It is converted to the canonical
`[gate | up]` rows on save and back on load, for the weight and for its optimizer moments, one tensor at
a time (a transient full copy of one in-proj).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from polycom_lm.distributed.tensor_parallel import (
    canonical_to_interleaved,
    interleaved_parameter_degrees,
    interleaved_to_canonical,
)
from polycom_lm.checkpoint.dcp import load_dcp, save_dcp


def _relayout(tensor: Any, tp: int, convert: Callable[[torch.Tensor, int], torch.Tensor]) -> Any:
    """Apply the row permutation `convert` to the global tensor behind `tensor`, keeping its placements."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return tensor
    if isinstance(tensor, DTensor):
        full = convert(tensor.full_tensor(), tp)
        # Every rank holds the full tensor, so each one cuts its own shard (no communication).
        return distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return convert(tensor, tp)


def _convert_interleaved(model: nn.Module, state: dict[str, Any], to_canonical: bool) -> None:
    """In `state` (`{"model": ..., "optimizer": ...}`), swap each interleaved gated in-proj tensor and its
    optimizer moments between the interleaved and the canonical layout."""
    degrees = interleaved_parameter_degrees(model)
    if not degrees:
        return
    convert = interleaved_to_canonical if to_canonical else canonical_to_interleaved
    model_state = state["model"]
    optimizer_moments = state.get("optimizer", {}).get("state", {})
    for name, tp in degrees.items():
        if name in model_state:
            model_state[name] = _relayout(model_state[name], tp, convert)
        moments = optimizer_moments.get(name)
        if moments:
            # The per-parameter dict may be the optimizer's live state: replace it, never mutate it.
            moments = optimizer_moments[name] = dict(moments)
            shape = model_state[name].shape
            for key, value in list(moments.items()):
                if isinstance(value, torch.Tensor) and value.shape == shape:
                    moments[key] = _relayout(value, tp, convert)


def save_sharded_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool
) -> None:
    """Write model and optimizer state of a (possibly FSDP / TP) model to `directory` with DCP."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _convert_interleaved(model, state, to_canonical=True)
    save_dcp(directory, state, distributed=distributed)


def load_sharded_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool
) -> None:
    """Load what `save_sharded_checkpoint` (or the `ddp` engine) wrote, on any world size / TP degree."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _convert_interleaved(model, state, to_canonical=True)
    load_dcp(directory, state, distributed=distributed)
    _convert_interleaved(model, state, to_canonical=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
