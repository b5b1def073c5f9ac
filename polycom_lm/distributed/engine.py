"""The seam between the training loop and data parallelism.

An engine is chosen by its registered name alone (`distributed.backend`: `ddp`, `fsdp`, `deepspeed`). It
owns three things and nothing else:
- data parallelism: how the (already tensor / expert parallel) model is wrapped across data-parallel
  ranks (`wrap`), what one micro-batch runs under (`micro_batch_context`), backward and the step;
- its optimizer wrapping (DeepSpeed wraps ours; the others use it as built);
- its checkpoint format (`save_checkpoint` / `load_checkpoint`).
Tensor and expert parallelism, activation checkpointing and compilation are transformations applied
before `wrap`, in order, by `parallelize.parallelize`; process groups and meshes come from `mesh.py`.

Contract every engine keeps:
- Data-parallel coordinates (`dp_rank`, `dp_world_size`) say which slice of each global batch this rank
  reads. Ranks in one tensor-parallel group share a dp_rank and read the same slice.
- Gradients are *averaged* over data-parallel ranks (as DDP, FSDP and DeepSpeed do). The loop therefore
  scales its local loss (sum of local token losses / global number of target tokens) by `dp_world_size`
  before `backward`, which makes the update equal to the single-process one.
- `clip_grad_norm` returns the global gradient norm (over all shards and ranks), before clipping.
- Checkpoints are directories; `save_checkpoint` / `load_checkpoint` handle model and optimizer state
  (and the engine's own, e.g. DeepSpeed's) and must allow resuming on a different world size where the
  engine supports it. Loading never unpickles anything but tensors and known checkpoint classes. The
  loop writes its own state (step, tokens, data position, RNG) beside them.
- `check_config` rejects settings the engine cannot run, with one line naming the key, before any
  process group or model exists.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from polycom_lm.checkpoint.dcp import load_dcp, save_dcp, save_dcp_async
from polycom_lm.config import Config
from polycom_lm.distributed.gradients import clip_gradients_, global_gradient_norm
from polycom_lm.distributed.mesh import ParallelMesh
from polycom_lm.distributed.state_dict import canonical_state, load_canonical_state
from polycom_lm.registry import Registry

ENGINES = Registry("distributed backend")

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine:
    """Base class: the DCP checkpoints, gradient norm and data-parallel reductions that `ddp` and `fsdp`
    share. Subclasses register with `@ENGINES.register("name")` and implement `wrap`."""

    # DeepSpeed needs a process group even on one process.
    needs_process_group = False

    def __init__(self, config: Config, device: torch.device, mesh: ParallelMesh):
        self.config = config
        self.device = device
        self.mesh = mesh
        self.module: Optional[nn.Module] = None  # the plain (possibly tensor / expert parallel) model
        self.pipeline = None  # a `pipeline.Pipeline` when distributed.pp > 1 (set by `parallelize`)
        self.model: nn.Module  # what the loop calls: model(input_ids) -> logits
        self.optimizer: torch.optim.Optimizer

    # -- configuration
    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        """Raise ConfigError for settings this engine cannot run (before anything is built)."""

    @classmethod
    def replicate_degree(cls, config: Config, dp: int) -> int:
        """How many of the `dp` data-parallel ranks hold full replicas (the rest shard): all of them."""
        return dp

    # -- topology
    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank

    @property
    def dp_world_size(self) -> int:
        return self.mesh.dims.dp

    @property
    def is_main_process(self) -> bool:
        """True on the one rank that writes logs, metrics files and progress bars."""
        return self.mesh.rank == 0

    # -- setup
    def wrap(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        """Apply data parallelism to `model` (the last step of `parallelize`) and build the optimizer over
        the wrapped parameters; sets `module`, `model` and `optimizer`."""
        raise NotImplementedError

    def data_parallel(self, model: nn.Module) -> nn.Module:
        """`model` wrapped for data parallelism (what `wrap` applies), for one pipeline stage."""
        raise NotImplementedError(f"distributed.backend={self.config.distributed.backend} does not run pipeline stages")

    def wrap_stages(self, parts: list[nn.Module], model: nn.Module, build_optimizer: OptimizerFactory) -> list[nn.Module]:
        """Pipeline parallelism: data parallelism on each of this rank's stage `parts` (none with one
        data-parallel rank), the optimizer over `model` (all parts under the whole model's names, which the
        loop, checkpoints and metrics use). Returns the wrapped parts, which the schedule runs."""
        wrapped = [self.data_parallel(part) if self.dp_world_size > 1 else part for part in parts]
        self.module = model
        self.model = model
        self.optimizer = build_optimizer(model)
        return wrapped

    def unwrapped_model(self) -> nn.Module:
        """The plain model (for reading coefficients, metrics, MoE statistics)."""
        assert self.module is not None, "wrap() has not been called"
        return self.module

    # -- one step
    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        """Context for forward+backward of one micro-batch (e.g. DDP's `no_sync` except on the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        parameters = list(self.unwrapped_model().parameters())
        total_norm = global_gradient_norm(parameters, self.device, self.mesh.pp_group)
        clip_gradients_(parameters, max_norm, total_norm)
        return total_norm

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over data-parallel ranks (for metrics and token counts)."""
        if not self.mesh.distributed or self.dp_world_size == 1:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.mesh.dp_group)
        return reduced

    def all_reduce_max_world(self, tensor: torch.Tensor) -> torch.Tensor:
        """The maximum of a small tensor over every rank of the job (for decisions all ranks take together)."""
        if not self.mesh.distributed:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced

    # -- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        state = canonical_state(self.unwrapped_model(), self.optimizer, self.mesh.pp_group)
        save_dcp(directory, state, distributed=self.mesh.distributed)

    def save_checkpoint_async(self, directory: Path, group: Optional[dist.ProcessGroup]) -> Future:
        """Stage the state as `save_checkpoint` would, return once it is copied, and write it in the
        background (collectives on `group`); the future completes when the shards are written."""
        state = canonical_state(self.unwrapped_model(), self.optimizer, self.mesh.pp_group)
        return save_dcp_async(directory, state, distributed=self.mesh.distributed, group=group)

    def load_checkpoint(self, directory: Path, trust_checkpoint: bool = False) -> None:
        """Restore model and optimizer state. Nothing but tensors and known checkpoint classes is unpickled;
        `trust_checkpoint` (the user's `--trust-checkpoint`) lifts that for formats that need it (DeepSpeed)."""
        state = canonical_state(self.unwrapped_model(), self.optimizer, self.mesh.pp_group)
        load_dcp(directory, state, distributed=self.mesh.distributed)
        load_canonical_state(self.unwrapped_model(), self.optimizer, state)

    def close(self) -> None:
        """Release process groups and other resources."""
        self.mesh.close()
