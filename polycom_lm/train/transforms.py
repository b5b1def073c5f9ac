"""Training-time transformations of a built model, applied before the engine parallelises it (the order
torchtitan uses: activation checkpointing, then compile, then data parallelism).

Both keep the module tree and parameter names unchanged (they replace a module's `forward` on the
instance instead of wrapping it in a new module), so checkpoints, optimizer groups and Hugging Face
conversion see the same names with or without them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from polycom_lm.config import TrainingConfig

logger = logging.getLogger(__name__)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """`activation`: recompute each block's `ffn.activation` in backward (the PolyCom paper's choice);
    `block`: recompute whole transformer blocks. Returns the number of modules wrapped."""
    if mode == "none":
        return 0
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("activation checkpointing needs a model with a `layers` list of blocks")
    wrapped = 0
    for block in layers:
        target = block if mode == "block" else block.ffn.activation
        target.forward = _checkpointed(target.forward)
        wrapped += 1
    logger.info("activation checkpointing (%s) on %d modules", mode, wrapped)
    return wrapped


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile` each transformer block separately (fast to compile, one graph reused by all layers
    of equal shape). Returns the number of blocks compiled."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("training.compile needs a model with a `layers` list of blocks")
    for block in layers:
        block.compile()
    logger.info("compiled %d transformer blocks with torch.compile", len(layers))
    return len(layers)


def apply_training_transforms(model: nn.Module, training: TrainingConfig) -> nn.Module:
    apply_activation_checkpointing(model, training.activation_checkpointing)
    if training.compile:
        compile_blocks(model)
    return model
