"""The `ddp` engine: plain PyTorch DistributedDataParallel, and the single-process path.

World size 1 (no `torchrun`): the model is used as is and no process group is created. Under `torchrun`
(`WORLD_SIZE` > 1): a process group is initialised (gloo on CPU, nccl on CUDA), the model is wrapped in
`DistributedDataParallel`, and `no_sync` skips the gradient all-reduce on all but the last micro-batch of
an accumulation window.

Checkpoints use `torch.distributed.checkpoint` (DCP) with `get_state_dict` / `set_state_dict` for model and
optimizer: DCP writes each replicated tensor once and loads it on any world size, so a run saved on two
ranks resumes on one and vice versa. Loading unpickles nothing but tensors (`weights_only`) and DCP's own
metadata classes (`SafeFileSystemReader`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from polycom_lm.checkpoint.dcp import load_dcp, save_dcp
from polycom_lm.config import Config
from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory

logger = logging.getLogger(__name__)


def init_process_group_from_environment(device: torch.device, timeout_minutes: int) -> bool:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    Returns True when this call created the group (and so should destroy it at the end).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    logger.info("initialised %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


@ENGINES.register("ddp")
class DDPEngine(Engine):
    """Data parallelism by replicated parameters and all-reduced (averaged) gradients."""

    def __new__(cls, config: Config, device: torch.device):
        if config.distributed.tp > 1:
            # DDP × tensor parallel lives with the other DTensor engines (replicated FSDP2 on a 2D mesh).
            from polycom_lm.distributed.fsdp import ReplicatedTensorParallelEngine

            return ReplicatedTensorParallelEngine(config, device)
        if config.distributed.ep > 1 and cls is DDPEngine:
            # DDP × expert parallel: experts sharded over EP groups (polycom_lm/distributed/expert_parallel.py).
            from polycom_lm.distributed.expert_parallel import ExpertParallelDDPEngine

            return super().__new__(ExpertParallelDDPEngine)  # Python then runs its __init__ once
        return super().__new__(cls)

    def __init__(self, config: Config, device: torch.device):
        super().__init__(config, device)
        self._owns_process_group = init_process_group_from_environment(
            device, config.distributed.timeout_minutes
        )
        self._distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._module: nn.Module | None = None

    # -- topology
    @property
    def dp_rank(self) -> int:
        return dist.get_rank() if self._distributed else 0

    @property
    def dp_world_size(self) -> int:
        return dist.get_world_size() if self._distributed else 1

    @property
    def is_main_process(self) -> bool:
        return self.dp_rank == 0

    # -- setup
    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        self._module = model
        if self._distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model
        self.optimizer = build_optimizer(model)

    def unwrapped_model(self) -> nn.Module:
        assert self._module is not None, "setup() has not been called"
        return self._module

    # -- one step
    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        if self._distributed and not is_last_micro_batch:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        # Gradients are identical on every rank after DDP's all-reduce, so the local norm is the global one.
        gradients = [p.grad for p in self.unwrapped_model().parameters() if p.grad is not None]
        if not gradients:
            return torch.zeros((), device=self.device)
        total_norm = torch.nn.utils.get_total_norm(gradients, norm_type=2.0, foreach=True)
        if max_norm is not None and math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(
                list(self.unwrapped_model().parameters()), max_norm, total_norm, foreach=True
            )
        return total_norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._distributed:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    # -- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        model_state, optimizer_state = get_state_dict(self.unwrapped_model(), self.optimizer)
        save_dcp(directory, {"model": model_state, "optimizer": optimizer_state}, distributed=self._distributed)

    def load_checkpoint(self, directory: Path, trust_checkpoint: bool = False) -> None:
        model_state, optimizer_state = get_state_dict(self.unwrapped_model(), self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        load_dcp(directory, state, distributed=self._distributed)
        set_state_dict(
            self.unwrapped_model(),
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )

    def close(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
