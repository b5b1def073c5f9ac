"""Process groups and device meshes: the one place that knows how ranks are laid out.

- World size 1 (no `torchrun`): no process group and no mesh, unless an engine needs a group anyway
  (DeepSpeed), which then gets a private one on a free local port.
- Under `torchrun` (`WORLD_SIZE` > 1): one default group (gloo on CPU, nccl on CUDA).

Layout of W ranks with tensor-parallel degree tp and expert-parallel degree ep:
- `("replicate", "shard", "tp")`: ranks `[d·tp, (d+1)·tp)` form one tensor-parallel group (neighbouring
  ranks, i.e. one node's fast links) and share data-parallel rank d. The W / tp data-parallel ranks are
  `replicate × shard` (HSDP; plain FSDP has replicate 1, DDP has shard 1), flattened as `"dp"`.
- `("expert_data", "expert")` (ep > 1): row i is the expert-parallel group of ranks `[i·ep, (i+1)·ep)`;
  column j (ranks j, j + ep, ...) holds the same experts and is data parallel for them.
- Pipeline parallel degree pp > 1 (`pipeline.py`): the outermost dimension, `("pp", "replicate", "shard",
  "tp")` (torchtitan's order): ranks `[s·W/pp, (s+1)·W/pp)` hold pipeline rank s, laid out inside as
  above (the expert mesh too, within each pipeline rank); ranks with equal coordinates but pp form a
  pipeline group.

`check_parallel_dims` rejects degrees that cannot work, before any group exists; each engine adds its own
limits (`Engine.check_config`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from polycom_lm.config import Config
from polycom_lm.distributed.pipeline import check_pipeline_config, global_batch_sequences
from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """World size of this launch: the default group's, else torchrun's `WORLD_SIZE`, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_world() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# NCCL's own watchdog, set the way torchtitan does (a user's setting wins): a timed-out or failed
# collective tears the process down instead of hanging, the flight recorder keeps the last collectives of
# every rank and dumps them on a timeout, and async collectives do not hold memory through record_stream.
NCCL_ENVIRONMENT = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # tear down, skipping the (possibly hanging) clean-up
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
}


def backstop_timeout_s(timeout_s: float) -> float:
    """The process group's own timeout: later than the watchdog's (`distributed/watchdog.py`), which names
    the ranks that did not arrive, so that the backend's timeout is only the backstop."""
    return timeout_s + max(10.0, 0.25 * timeout_s)


def init_process_group(device: torch.device, timeout_s: float, always: bool = False) -> bool:
    """Create the default process group: from torchrun's environment when WORLD_SIZE > 1, or (with
    `always`) a private one-process group. Returns True when this call created it (and so destroys it)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=backstop_timeout_s(timeout_s))
    if backend == "nccl":
        for key, value in NCCL_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        logger.info("initialised %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
        return True
    if not always:
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    # Libraries that read their coordinates from the environment (DeepSpeed) see what a launcher would set.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    return True


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism of one run; data-parallel ranks = world / tp = replicate × shard."""

    world_size: int
    tp: int = 1
    ep: int = 1
    replicate: int = 1  # data-parallel replicas (HSDP); the rest of the dp ranks shard
    pp: int = 1  # pipeline stages (ranks per pipeline); dp = world / (tp × pp)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def shard(self) -> int:
        return self.dp // self.replicate


def check_parallel_dims(config: Config, world_size: int) -> None:
    """Reject tensor / expert / sequence parallel degrees that cannot work for this model, naming the key
    and what would be valid. Engine-specific limits are each engine's `check_config`."""
    distributed, model = config.distributed, config.model
    tp, ep = distributed.tp, distributed.ep
    if tp < 1:
        raise ConfigError(f"distributed.tp must be a positive integer, got {tp}")
    if ep < 1:
        raise ConfigError(f"distributed.ep must be a positive integer, got {ep}")
    if world_size % tp:
        raise ConfigError(
            f"world size {world_size} is not divisible by distributed.tp={tp}; "
            f"use a tp that divides {world_size} (e.g. {_divisors(world_size)})"
        )
    _check_pipeline_dims(config, world_size)
    world_size //= distributed.pp  # tensor and expert groups lie within one pipeline rank
    if ep > 1:
        if model.family != "moe":
            raise ConfigError(f"distributed.ep={ep} needs model.family 'moe', got {model.family!r}; set ep to 1")
        experts = model.moe.num_experts
        valid = ", ".join(str(d) for d in range(1, experts + 1) if experts % d == 0 and world_size % d == 0)
        if experts % ep:
            raise ConfigError(
                f"distributed.ep={ep} does not divide model.moe.num_experts={experts}; valid ep degrees for "
                f"{experts} experts on {world_size} ranks: {valid}"
            )
        if world_size % ep:
            raise ConfigError(f"distributed.ep={ep} does not divide the world size {world_size}; valid: {valid}")
        if tp > 1:
            raise ConfigError("distributed.ep > 1 with distributed.tp > 1 is not supported; use one of them")
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
        if distributed.sequence_parallel and config.training.seq_len % tp:
            raise ConfigError(
                f"distributed.sequence_parallel splits each sequence over tp={tp} ranks, but training.seq_len="
                f"{config.training.seq_len} is not divisible by {tp}"
            )


def _check_pipeline_dims(config: Config, world_size: int) -> None:
    distributed = config.distributed
    pp, tp = distributed.pp, distributed.tp
    if pp < 1:
        raise ConfigError(f"distributed.pp must be a positive integer, got {pp}")
    if pp == 1:
        return
    if distributed.backend == "deepspeed":
        raise ConfigError("distributed.backend=deepspeed does not compose with distributed.pp > 1 (DeepSpeed's "
                          "own pipeline engine refuses ZeRO-2/3); use backend ddp or fsdp")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by distributed.pp={pp} x distributed.tp={tp}; valid pp "
            f"with this tp: {', '.join(str(d) for d in range(1, world_size // tp + 1) if (world_size // tp) % d == 0)}"
        )
    dp = world_size // (tp * pp)
    global_batch = global_batch_sequences(config)
    if global_batch % dp:
        raise ConfigError(f"global batch of {global_batch} sequences does not split over {dp} data-parallel ranks")
    check_pipeline_config(config, world_size, dp, global_batch // dp)


class ParallelMesh:
    """The device meshes of one run over the default process group. On one process there is none: every
    group property is None and collectives are skipped by their callers."""

    def __init__(self, dims: ParallelDims, device: torch.device, owns_process_group: bool = False):
        self.dims = dims
        self.device = device
        self.owns_process_group = owns_process_group
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    @property
    def dp_rank(self) -> int:
        return (self.rank % (self.dims.world_size // self.dims.pp)) // self.dims.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dims.world_size // self.dims.pp)

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        """Group of this rank's pipeline (one rank per stage); None without pipeline parallelism."""
        return self.world["pp"].get_group() if self.dims.pp > 1 else None

    @cached_property
    def world(self) -> Optional[DeviceMesh]:
        """`("replicate", "shard", "tp")` with `"dp"` = replicate × shard flattened; None on one process."""
        if not self.distributed:
            return None
        dims = self.dims
        if dims.pp > 1:
            mesh = init_device_mesh(self.device.type, (dims.pp, dims.replicate, dims.shard, dims.tp),
                                    mesh_dim_names=("pp", "replicate", "shard", "tp"))
        else:
            mesh = init_device_mesh(
                self.device.type, (dims.replicate, dims.shard, dims.tp), mesh_dim_names=("replicate", "shard", "tp")
            )
        mesh["replicate", "shard"]._flatten("dp")
        return mesh

    @property
    def tp_mesh(self) -> Optional[DeviceMesh]:
        return self.world["tp"] if self.world is not None and self.dims.tp > 1 else None

    @property
    def data_mesh(self) -> Optional[DeviceMesh]:
        """The mesh FSDP shards and replicates over: 2-D `(replicate, shard)` for HSDP, else 1-D."""
        if self.world is None:
            return None
        return self.world["replicate", "shard"] if self.dims.replicate > 1 else self.world["shard"]

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        """Group of the data-parallel ranks (the default group when there is no tensor parallelism)."""
        if not self.distributed:
            return None
        return self.world["dp"].get_group() if self.dims.tp > 1 or self.dims.pp > 1 else dist.group.WORLD

    @cached_property
    def expert(self) -> Optional[DeviceMesh]:
        """`("expert_data", "expert")` of shape (W / ep, ep); None without expert parallelism."""
        if self.dims.ep == 1 or not dist.is_initialized():
            return None
        dims = self.dims
        if dims.pp > 1:
            mesh = init_device_mesh(self.device.type, (dims.pp, dims.world_size // (dims.pp * dims.ep), dims.ep),
                                    mesh_dim_names=("pp", "expert_data", "expert"))
            return mesh["expert_data", "expert"]
        return init_device_mesh(
            self.device.type, (dims.world_size // dims.ep, dims.ep), mesh_dim_names=("expert_data", "expert")
        )

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _divisors(number: int) -> str:
    return ", ".join(str(d) for d in range(1, number + 1) if number % d == 0)


def _common_divisors(first: int, second: int) -> str:
    return ", ".join(str(d) for d in range(1, min(first, second) + 1) if first % d == 0 and second % d == 0)
