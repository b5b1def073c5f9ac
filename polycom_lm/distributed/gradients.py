"""The global gradient norm and clipping by it, for every kind of parameter an engine can hold: plain
tensors (replicated), DTensors (FSDP / tensor-parallel shards, replicated placements counted once) and
local shards marked by expert parallelism (`local_shards.py`)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from polycom_lm.distributed.local_shards import as_global, local_shard_layout


def _gradient_groups(parameters: list[nn.Parameter]) -> dict[object, list[torch.Tensor]]:
    """Gradients grouped by layout: foreach kernels cannot mix DTensors of different meshes or placements
    (or DTensors with plain tensors). Plain, replicated gradients form the group `None`."""
    groups: dict[object, list[torch.Tensor]] = {}
    for parameter in parameters:
        gradient = parameter.grad
        if gradient is None:
            continue
        layout = local_shard_layout(parameter)
        if layout is not None:
            gradient = as_global(gradient, layout)
        key = (gradient.device_mesh, gradient.placements) if isinstance(gradient, DTensor) else None
        groups.setdefault(key, []).append(gradient)
    return groups


def global_gradient_norm(parameters: list[nn.Parameter], device: torch.device,
                         stage_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """L2 norm of all gradients over every shard and rank (a collective where gradients are sharded).
    `stage_group`: the pipeline group, whose ranks hold disjoint parameters (their squares are summed)."""
    if stage_group is not None:
        squared = global_gradient_norm(parameters, device).to(device=device, dtype=torch.float32) ** 2
        dist.all_reduce(squared, group=stage_group)
        return squared.sqrt()
    groups = _gradient_groups(parameters)
    if not groups:
        return torch.zeros((), device=device)
    norms = []
    for gradients in groups.values():
        norm = torch.nn.utils.get_total_norm(gradients, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm)
    if len(norms) == 1:
        return norms[0].to(device)
    return torch.stack([norm.to(device=device, dtype=torch.float32) ** 2 for norm in norms]).sum().sqrt()


def clip_gradients_(parameters: list[nn.Parameter], max_norm: Optional[float], total_norm: torch.Tensor) -> None:
    """Scale every gradient in place by min(1, max_norm / (total_norm + 1e-6)) (torch's clipping rule)."""
    if max_norm is None or not math.isfinite(max_norm):
        return
    plain = [p for p in parameters if p.grad is not None and not isinstance(p.grad, DTensor)]
    if plain:
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total_norm, foreach=True)
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for parameter in parameters:
        if isinstance(parameter.grad, DTensor):
            parameter.grad.mul_(scale.to(parameter.grad.device))
