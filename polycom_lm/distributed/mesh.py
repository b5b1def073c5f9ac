"""Device meshes for data × tensor parallelism, and the engine checks that run before any work starts.

The world is laid out as `("replicate", "shard", "tp")`: ranks `[d * tp, (d + 1) * tp)` form one
tensor-parallel group (neighbouring ranks, i.e. one node's fast links) and share data-parallel rank `d`;
the data-parallel ranks are `replicate × shard` (HSDP; plain FSDP has replicate 1, DDP × TP has shard 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from polycom_lm.config import Config
from polycom_lm.errors import ConfigError

SUPPORTED_ZERO_STAGES = (1, 2, 3)


def current_world() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def validate_parallel_config(config: Config, world_size: int) -> None:
    """Reject engine settings that cannot work, naming the key and what would be valid.

    Runs before the model is built. Width checks that depend on the built FFN happen in
    `tensor_parallel.parallelize_tensor_parallel`, still before the first step.
    """
    from polycom_lm.distributed.expert_parallel import validate_expert_parallel_config

    validate_expert_parallel_config(config, world_size)  # ep: divides experts and world, backend ddp
    distributed = config.distributed
    model = config.model
    tp = distributed.tp
    if tp < 1:
        raise ConfigError(f"distributed.tp must be a positive integer, got {tp}")
    if world_size % tp:
        raise ConfigError(
            f"world size {world_size} is not divisible by distributed.tp={tp}; "
            f"use a tp that divides {world_size} (e.g. {_divisors(world_size)})"
        )
    if tp > 1:
        kv_heads = model.n_kv_heads or model.n_heads
        if model.n_heads % tp or kv_heads % tp:
            raise ConfigError(
                f"distributed.tp={tp} does not divide the attention heads (model.n_heads={model.n_heads}, "
                f"n_kv_heads={kv_heads}); valid tp degrees: {_common_divisors(model.n_heads, kv_heads)}"
            )
        if model.qk_norm and model.qk_norm_scope == "full":
            raise ConfigError(
                "model.qk_norm_scope='full' normalises over the whole projection width and is not "
                "supported with distributed.tp > 1; use qk_norm_scope='head' or tp=1"
            )
        if model.family != "dense":
            raise ConfigError(
                f"distributed.tp > 1 is implemented for model.family='dense', got {model.family!r}; "
                "use distributed.ep for mixture-of-experts models"
            )
        if distributed.backend == "deepspeed":
            raise ConfigError(
                "distributed.backend='deepspeed' does not compose with distributed.tp > 1 here; "
                "use backend 'fsdp' or 'ddp' for tensor parallelism"
            )
        if distributed.sequence_parallel and config.training.seq_len % tp:
            raise ConfigError(
                f"distributed.sequence_parallel splits each sequence over tp={tp} ranks, but training.seq_len="
                f"{config.training.seq_len} is not divisible by {tp}"
            )
    if distributed.backend == "deepspeed" and distributed.zero_stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"distributed.zero_stage={distributed.zero_stage} is not a ZeRO stage; valid: "
            f"{', '.join(map(str, SUPPORTED_ZERO_STAGES))}"
        )
    if distributed.backend == "fsdp":
        dp = world_size // tp
        replicate = distributed.fsdp_replicate
        if replicate < 1 or dp % replicate:
            raise ConfigError(
                f"distributed.fsdp_replicate={replicate} must divide the data-parallel size {dp} "
                f"(world size {world_size} / tp {tp}); valid: {_divisors(dp)}"
            )


def build_data_tensor_mesh(device: torch.device, world_size: int, replicate: int, tp: int) -> DeviceMesh:
    """The `("replicate", "shard", "tp")` mesh of `world_size` ranks, with the flattened `"dp"` dimension
    (`replicate × shard`) registered for data-parallel collectives. Neighbouring ranks form a TP group."""
    shard = world_size // tp // replicate
    mesh = init_device_mesh(device.type, (replicate, shard, tp), mesh_dim_names=("replicate", "shard", "tp"))
    mesh["replicate", "shard"]._flatten("dp")
    return mesh


def _divisors(number: int) -> str:
    return ", ".join(str(d) for d in range(1, number + 1) if number % d == 0)


def _common_divisors(first: int, second: int) -> str:
    return ", ".join(str(d) for d in range(1, min(first, second) + 1) if first % d == 0 and second % d == 0)
