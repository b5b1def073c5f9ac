"""Parameters that are plain local tensors but hold one shard of a larger global tensor.

DTensor parameters (FSDP, tensor parallel) know their global shape themselves. Expert parallelism keeps
its expert shards as plain tensors (the experts' grouped matmuls and all-to-alls work on local tensors)
and marks each with the mesh and placements that describe the global tensor. Two places read the mark:
- the checkpoint state (`state_dict.py`) writes such a parameter, and its optimizer moments, as the
  DTensor `DTensor.from_local(local, mesh, placements)`, so each global tensor is stored once and
  reloads on any layout;
- the global gradient norm (`gradients.py`) counts each element of the global gradient once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement

_ATTRIBUTE = "_polycom_local_shard_layout"

Layout = tuple[DeviceMesh, tuple[Placement, ...]]


def mark_local_shard(parameter: torch.Tensor, mesh: DeviceMesh, placements: Sequence[Placement]) -> None:
    """Record that `parameter` is this rank's shard of a global tensor laid out by `placements` on `mesh`."""
    setattr(parameter, _ATTRIBUTE, (mesh, tuple(placements)))


def local_shard_layout(parameter: torch.Tensor) -> Optional[Layout]:
    return getattr(parameter, _ATTRIBUTE, None)


def as_global(tensor: torch.Tensor, layout: Layout) -> DTensor:
    """A local shard (a parameter, its gradient or an optimizer moment of its shape) as the global DTensor."""
    mesh, placements = layout
    return DTensor.from_local(tensor, mesh, placements, run_check=False)
