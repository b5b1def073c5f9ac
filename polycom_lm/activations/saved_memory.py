"""Measuring what autograd keeps for backward, in bytes."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_tensor_bytes(function: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running `function()`.

    Tensors sharing storage (views, or the same tensor saved twice) are counted once, by storage. The
    inputs that `function` closes over count too when they are saved, as they would in a model (the
    memory stays alive until backward either way). Tensors sharing storage with one in `exclude` (e.g.
    a module's parameters, which live on regardless) are not counted.
    """
    excluded = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
    storages: dict[tuple[int, torch.device], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key in excluded:
            return tensor
        storages[key] = max(storages.get(key, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())
