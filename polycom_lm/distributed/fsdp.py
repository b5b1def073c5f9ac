"""The `fsdp` engine: FSDP2 `fully_shard` per transformer block and at the root, optionally on top of
tensor parallelism and as HSDP (data-parallel ranks split into replicate × shard, `mesh.py`).

- Mixed precision: with `training.precision: bf16`, parameters are all-gathered in bf16 for compute and
  gradients reduced in fp32 (`MixedPrecisionPolicy`); the sharded master weights stay fp32.
- `distributed.fsdp_cpu_offload`: sharded parameters, gradients and optimizer state live on the CPU.
- `distributed.fsdp_replicate` > 1: HSDP, parameters sharded within groups of dp / replicate ranks and
  replicated across the groups (gradients reduce-scattered inside a group, all-reduced across).
- Gradient accumulation: the reduce-scatter runs on the last micro-batch only.
- Checkpoints: DCP in the canonical layout (`state_dict.py`), so they resume on any world size, TP degree
  or engine that uses it.

World size 1 (no torchrun) runs the plain model. `apply_fsdp` is also how the `ddp` engine replicates a
tensor-parallel model (HSDP with a shard degree of 1: classic DDP does not take DTensor parameters).
"""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from polycom_lm.config import Config
from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory
from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)


def apply_fsdp(model: nn.Module, data_mesh: DeviceMesh, precision: str, cpu_offload: bool, device: torch.device) -> None:
    """`fully_shard` each block of `model.layers`, then the root (embeddings, final norm, head: gathered for
    the whole step anyway, so not resharded after forward)."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("FSDP takes a materialised model (build it on a real device)")
    kwargs: dict = {"mesh": data_mesh}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        # Pinned host memory makes the host<->GPU copies asynchronous; there is none to pin without a GPU.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # Expert-parallel shards reduce their own gradients (expert_parallel.py) and stay out, as under DDP.
    ignored_names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    if ignored_names:
        kwargs["ignored_params"] = {p for name, p in model.named_parameters() if name in ignored_names}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, reshard_after_forward=False, **kwargs)


def fsdp_micro_batch_context(model: nn.Module, is_last_micro_batch: bool) -> ContextManager:
    """Accumulate unsharded gradients locally; reduce (-scatter) once, on the last micro-batch."""
    model.set_requires_gradient_sync(is_last_micro_batch)
    model.set_is_last_backward(is_last_micro_batch)
    return contextlib.nullcontext()


@ENGINES.register("fsdp")
class FSDPEngine(Engine):
    """FSDP2 (optionally over a tensor-parallel model, optionally HSDP)."""

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        distributed = config.distributed
        parallel = distributed.tp * distributed.pp
        dp = world_size // parallel if world_size % parallel == 0 else world_size
        replicate = distributed.fsdp_replicate
        if replicate < 1 or dp % replicate:
            valid = ", ".join(str(d) for d in range(1, dp + 1) if dp % d == 0)
            raise ConfigError(
                f"distributed.fsdp_replicate={replicate} must divide the data-parallel size {dp} "
                f"(world size {world_size} / tp {distributed.tp}); valid: {valid}"
            )
        if distributed.ep > 1:
            raise ConfigError(
                f"distributed.ep > 1 is implemented with distributed.backend 'ddp' (experts sharded by EP, the "
                f"rest replicated), got 'fsdp'; set distributed.backend=ddp or ep=1"
            )

    @classmethod
    def replicate_degree(cls, config: Config, dp: int) -> int:
        return config.distributed.fsdp_replicate

    def wrap(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        self.module = model
        if self.mesh.distributed:
            apply_fsdp(model, self.mesh.data_mesh, self.config.training.precision,
                       self.config.distributed.fsdp_cpu_offload, self.device)
            logger.info(
                "fsdp: %d blocks sharded over %d data-parallel ranks (replicate %d), tp %d, precision %s",
                len(model.layers), self.dp_world_size, self.mesh.dims.replicate, self.mesh.dims.tp,
                self.config.training.precision,
            )
        self.model = model
        self.optimizer = build_optimizer(model)

    def data_parallel(self, model: nn.Module) -> nn.Module:
        apply_fsdp(model, self.mesh.data_mesh, self.config.training.precision,
                   self.config.distributed.fsdp_cpu_offload, self.device)
        return model

    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        if self.mesh.distributed:
            return fsdp_micro_batch_context(self.model, is_last_micro_batch)
        return contextlib.nullcontext()
