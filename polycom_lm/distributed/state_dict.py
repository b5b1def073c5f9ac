"""Model + optimizer state in the canonical layout that every engine's DCP checkpoint stores.

`canonical_state(model, optimizer)` is `{"model": ..., "optimizer": ...}` from
`torch.distributed.checkpoint.state_dict.get_state_dict` (fully qualified parameter names, FSDP and
tensor-parallel parameters as DTensors), with two layouts that are not the plain global tensor rewritten:

1. The interleaved `[gate_r | up_r]` storage of a gated in-proj under tensor parallelism
   (`tensor_parallel.py`) becomes the canonical `[gate | up]` rows, for the weight and its optimizer
   moments, one tensor at a time (a transient full copy of one in-proj).
2. Expert-parallel shards, plain local tensors marked by `local_shards.mark_local_shard`, become DTensors
   sharded along the expert dim (views of the live tensors, no copy).

DCP stores global tensors with each shard's offset, so a checkpoint written by any engine, world size,
TP or EP degree loads into any other: `load_canonical_state` applies the loaded canonical state back.

Under pipeline parallelism (`stage_group`, the pp group) each rank holds some parameters only; DCP keys
the optimizer's parameter groups by position, so every rank's groups are merged (by group name, in order
of first appearance over the stages, which is the single-process order; each group listing every stage's
parameters): the same list on every rank, as one process would write it. Loading matches groups to
parameters by name and ignores the ones another stage holds, so any pp degree reads any other's.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from polycom_lm.distributed.local_shards import as_global, local_shard_layout
from polycom_lm.distributed.tensor_parallel import (
    canonical_to_interleaved,
    interleaved_parameter_degrees,
    interleaved_to_canonical,
)

State = dict[str, Any]


def canonical_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    stage_group: Optional[dist.ProcessGroup] = None) -> State:
    """`{"model": ..., "optimizer": ...}` of `model` and `optimizer` in the canonical layout. The returned
    dicts are new (the optimizer's own per-parameter dicts are copied, never modified). `stage_group`: the
    pipeline group, whose ranks' parameter groups are merged (a collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": dict(model_state), "optimizer": dict(optimizer_state)}
    if "state" in optimizer_state:
        state["optimizer"]["state"] = {name: dict(moments) for name, moments in optimizer_state["state"].items()}
    if stage_group is not None and "param_groups" in optimizer_state:
        state["optimizer"]["param_groups"] = _merged_parameter_groups(optimizer_state["param_groups"], stage_group)
    _relayout_interleaved(model, state, interleaved_to_canonical)
    _map_local_shards(model, state, lambda tensor, layout: as_global(tensor, layout))
    return state


def _merged_parameter_groups(groups: list[dict], stage_group: dist.ProcessGroup) -> list[dict]:
    gathered: list[Optional[list[dict]]] = [None] * dist.get_world_size(stage_group)
    dist.all_gather_object(gathered, groups, group=stage_group)
    merged: dict[object, dict] = {}
    for stage_groups in gathered:
        for group in stage_groups or []:
            key = group.get("name", len(merged))
            if key not in merged:
                merged[key] = {**group, "params": list(group["params"])}
            else:
                merged[key]["params"].extend(name for name in group["params"] if name not in merged[key]["params"])
    return list(merged.values())


def load_canonical_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: State) -> None:
    """Set `model` and `optimizer` from a canonical `state` (as filled in by a DCP load)."""
    _map_local_shards(model, state, lambda tensor, layout: tensor.to_local())
    _relayout_interleaved(model, state, canonical_to_interleaved)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _each_tensor_of(state: State, name: str):
    """(container, key) of parameter `name`'s value and of each optimizer moment of the same shape."""
    value = state["model"][name]
    yield state["model"], name
    for moments in (state["optimizer"].get("state", {}).get(name),):
        for key, moment in (moments or {}).items():
            if isinstance(moment, torch.Tensor) and moment.shape == value.shape:
                yield moments, key


def _relayout_interleaved(model: nn.Module, state: State, convert: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    for name, tp in interleaved_parameter_degrees(model).items():
        if name in state["model"]:
            for container, key in list(_each_tensor_of(state, name)):
                container[key] = _relayout(container[key], tp, convert)


def _relayout(tensor: Any, tp: int, convert: Callable[[torch.Tensor, int], torch.Tensor]) -> Any:
    """Apply the row permutation `convert` to the global tensor behind `tensor`, keeping its placements."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return tensor
    if isinstance(tensor, DTensor):
        full = convert(tensor.full_tensor(), tp)
        # Every rank holds the full tensor, so each one cuts its own shard (no communication).
        return distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return convert(tensor, tp)


def _map_local_shards(model: nn.Module, state: State, convert: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
    """Replace the value (and same-shaped moments) of every marked local-shard parameter by `convert`."""
    for name, parameter in model.named_parameters():
        layout = local_shard_layout(parameter)
        if layout is not None and name in state["model"]:
            for container, key in list(_each_tensor_of(state, name)):
                container[key] = convert(container[key], layout)
