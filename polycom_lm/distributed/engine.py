"""The seam between the training loop and the parallelism strategies.

An `Engine` takes a plain, single-device model (built by `polycom_lm.models.build_model`) and applies a
parallelism strategy to it from outside: DDP, FSDP2, DeepSpeed ZeRO, tensor / expert parallelism. The loop
only ever talks to this interface, so adding an engine never touches the loop.

Contract every engine keeps:
- Data-parallel coordinates (`dp_rank`, `dp_world_size`) say which slice of each global batch this rank
  reads. Ranks in one tensor-parallel group share a dp_rank and read the same slice.
- Gradients are *averaged* over data-parallel ranks (as DDP, FSDP and DeepSpeed do). The loop therefore
  scales its local loss (sum of local token losses / global number of target tokens) by `dp_world_size`
  before `backward`, which makes the update equal to the single-process one.
- `clip_grad_norm` returns the global gradient norm (over all shards and ranks), before clipping.
- Checkpoints are directories; `save_checkpoint` / `load_checkpoint` handle model and optimizer state
  (and the engine's own, e.g. DeepSpeed's), and must allow resuming on a different world size where the
  engine supports it. The loop writes its own state (step, tokens, data position, RNG) beside them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from polycom_lm.config import Config
from polycom_lm.registry import Registry

ENGINES = Registry("distributed backend")

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Engine:
    """Base class. Subclasses register with `@ENGINES.register("name")`."""

    def __init__(self, config: Config, device: torch.device):
        self.config = config
        self.device = device
        self.model: nn.Module  # what the loop calls: model(input_ids) -> logits
        self.optimizer: torch.optim.Optimizer

    # -- topology
    @property
    def dp_rank(self) -> int:
        return 0

    @property
    def dp_world_size(self) -> int:
        return 1

    @property
    def is_main_process(self) -> bool:
        """True on the one rank that writes logs, metrics files and progress bars."""
        return True

    # -- setup
    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        """Parallelise `model` and build the optimizer over the parallelised parameters."""
        raise NotImplementedError

    def unwrapped_model(self) -> nn.Module:
        """The plain model (for reading coefficients, metrics, MoE statistics)."""
        return self.model

    # -- one step
    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        """Context for forward+backward of one micro-batch (e.g. DDP's `no_sync` except on the last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        raise NotImplementedError

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over data-parallel ranks (for metrics and token counts)."""
        return tensor

    # -- checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, directory: Path, trust_checkpoint: bool = False) -> None:
        """Restore model and optimizer state. Nothing but tensors and known checkpoint classes is unpickled;
        `trust_checkpoint` (the user's `--trust-checkpoint`) lifts that for formats that need it (DeepSpeed)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release process groups and other resources."""


def build_engine(config: Config, device: torch.device) -> Engine:
    return ENGINES.get(config.distributed.backend)(config, device)
