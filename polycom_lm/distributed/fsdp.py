"""The `fsdp` engine: FSDP2 `fully_shard` per transformer block and at the root, optionally on top of
tensor parallelism (a `("dp", "tp")` mesh) and as HSDP (data-parallel ranks split into replicate × shard).

- Mixed precision: with `training.precision: bf16`, parameters are all-gathered in bf16 for compute and
  gradients reduced in fp32 (`MixedPrecisionPolicy`); the sharded master weights stay fp32.
- `distributed.fsdp_cpu_offload`: sharded parameters, gradients and optimizer state live on the CPU.
- `distributed.fsdp_replicate` > 1: HSDP, parameters sharded within groups of dp / replicate ranks and
  replicated across the groups (gradients reduce-scattered inside a group, all-reduced across).
- Gradient accumulation: the reduce-scatter runs on the last micro-batch only.
- Checkpoints: DCP, in the same layout as the `ddp` engine (`checkpointing.py`), so they resume on any
  world size, TP degree or engine that uses it.

World size 1 (no torchrun) runs the plain model, as `ddp` does.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from polycom_lm.config import Config
from polycom_lm.distributed.checkpointing import load_sharded_checkpoint, save_sharded_checkpoint
from polycom_lm.distributed.ddp import init_process_group_from_environment
from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory
from polycom_lm.distributed.mesh import build_data_tensor_mesh, current_world, validate_parallel_config
from polycom_lm.distributed.tensor_parallel import parallelize_tensor_parallel

logger = logging.getLogger(__name__)


def global_gradient_norm(parameters: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients, over every shard and rank. DTensor gradients (FSDP / TP shards) reduce
    over their mesh; replicated placements count once."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    if not gradients:
        return torch.zeros((), device=device)
    # Group by mesh: foreach kernels cannot mix DTensors of different meshes (or plain tensors).
    groups: dict[object, list[torch.Tensor]] = {}
    for gradient in gradients:
        key = (gradient.device_mesh, gradient.placements) if isinstance(gradient, DTensor) else None
        groups.setdefault(key, []).append(gradient)
    squares = []
    for grouped in groups.values():
        norm = torch.nn.utils.get_total_norm(grouped, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.to(device=device, dtype=torch.float32) ** 2)
    return torch.stack(squares).sum().sqrt()


def clip_gradients_(parameters: list[nn.Parameter], max_norm: Optional[float], total_norm: torch.Tensor) -> None:
    """Scale gradients in place so that their global norm is at most `max_norm`."""
    if max_norm is None or not math.isfinite(max_norm):
        return
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad.mul_(scale.to(parameter.grad.device))


@ENGINES.register("fsdp")
class FSDPEngine(Engine):
    """FSDP2 (optionally × tensor parallel, optionally HSDP)."""

    def __init__(self, config: Config, device: torch.device):
        super().__init__(config, device)
        self._owns_process_group = init_process_group_from_environment(
            device, config.distributed.timeout_minutes
        )
        self._world_size, self._rank = current_world()
        validate_parallel_config(config, self._world_size)
        self._tp = config.distributed.tp
        self._distributed = self._world_size > 1
        self._mesh: Optional[DeviceMesh] = None
        self._dp_group: Optional[dist.ProcessGroup] = None
        if self._distributed:
            self._mesh = build_data_tensor_mesh(device, self._world_size, self._replicate_degree(), self._tp)
            self._dp_group = self._mesh["dp"].get_group()
        self._module: Optional[nn.Module] = None

    def _replicate_degree(self) -> int:
        return self.config.distributed.fsdp_replicate

    # -- topology
    @property
    def dp_rank(self) -> int:
        return self._rank // self._tp

    @property
    def dp_world_size(self) -> int:
        return self._world_size // self._tp

    @property
    def is_main_process(self) -> bool:
        return self._rank == 0

    # -- setup
    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("the fsdp engine takes a materialised model (build it on a real device)")
        self._module = model
        if self._distributed:
            assert self._mesh is not None
            if self._tp > 1:
                parallelize_tensor_parallel(
                    model,
                    self._mesh["tp"],
                    sequence_parallel=self.config.distributed.sequence_parallel,
                    recompute_activations=self.config.training.activation_checkpointing == "activation",
                )
            self._shard(model)
        self.model = model
        self.optimizer = build_optimizer(model)

    def _shard(self, model: nn.Module) -> None:
        assert self._mesh is not None
        distributed = self.config.distributed
        replicate = self._replicate_degree()
        data_mesh = self._mesh["replicate", "shard"] if replicate > 1 else self._mesh["shard"]
        kwargs: dict = {"mesh": data_mesh}
        if self.config.training.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if distributed.fsdp_cpu_offload:
            # Pinned host memory makes the host<->GPU copies asynchronous; there is none to pin without a GPU.
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        for block in model.layers:
            fully_shard(block, **kwargs)
        # The root holds embeddings, final norm and head; it is gathered for the whole step anyway.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        logger.info(
            "fsdp: %d blocks sharded over %d data-parallel ranks (replicate %d), tp %d, precision %s",
            len(model.layers), self.dp_world_size, replicate, self._tp,
            self.config.training.precision,
        )

    def unwrapped_model(self) -> nn.Module:
        assert self._module is not None, "setup() has not been called"
        return self._module

    # -- one step
    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        if self._distributed:
            # Accumulate unsharded gradients locally; reduce-scatter once, on the last micro-batch.
            self.model.set_requires_gradient_sync(is_last_micro_batch)
            self.model.set_is_last_backward(is_last_micro_batch)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        parameters = list(self.model.parameters())
        total_norm = global_gradient_norm(parameters, self.device)
        clip_gradients_(parameters, max_norm, total_norm)
        return total_norm

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._distributed:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self._dp_group)
        return reduced

    # -- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        save_sharded_checkpoint(directory, self.unwrapped_model(), self.optimizer, self._distributed)

    def load_checkpoint(self, directory: Path, trust_checkpoint: bool = False) -> None:
        load_sharded_checkpoint(directory, self.unwrapped_model(), self.optimizer, self._distributed)

    def close(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


class ReplicatedTensorParallelEngine(FSDPEngine):
    """`ddp` with `distributed.tp` > 1: tensor parallel inside each group of tp ranks, parameters fully
    replicated across the data-parallel groups and gradients all-reduced (averaged), i.e. DDP semantics.

    Implemented as HSDP with a shard degree of 1 (FSDP2 handles DTensor parameters from TP, which classic
    `DistributedDataParallel` does not). The `ddp` engine hands over to this class when tp > 1.
    """

    def _replicate_degree(self) -> int:
        return self._world_size // self._tp
