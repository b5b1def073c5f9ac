"""From config to parallel model, in one place: build the engine, then transform the built model in
order, read top to bottom (the shape of torchtitan's `parallelize_llama`):

    build_engine(config, device)           check every setting, create the process group and meshes
    parallelize(model, config, engine, f)  pipeline split → tensor parallel → expert parallel → activation
                                           checkpointing → compile → data parallelism (the engine's `wrap`,
                                           per pipeline stage `wrap_stages`) + optimizer

Each transformation is a plain function that changes the model in place; none of them changes the
parameter names (the pipeline split only drops the modules other stages hold; activation checkpointing
and compile replace `forward` on the instance), so checkpoints, optimizer groups and Hugging Face
conversion see the same names whatever was applied. The order matters where two meet: activation checkpointing wraps the tensor-parallel
forward, so a recomputation sees local coefficients and reduces PolyNorm's row sums again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from polycom_lm.config import Config
from polycom_lm.distributed import ddp, deepspeed_engine, fsdp  # noqa: F401  (register the engines)
from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory
from polycom_lm.distributed.expert_parallel import ExpertParallel, apply_expert_parallel
from polycom_lm.distributed.mesh import (
    ParallelDims,
    ParallelMesh,
    check_parallel_dims,
    init_process_group,
    launched_world_size,
)
from polycom_lm.distributed.pipeline import (
    Pipeline,
    StageModules,
    global_batch_sequences,
    pipeline_micro_batches,
    split_model,
)
from polycom_lm.distributed.tensor_parallel import apply_tensor_parallel
from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)


def engine_class(config: Config) -> type[Engine]:
    """The engine registered as `distributed.backend` (a one-line error listing the registered ones)."""
    if config.distributed.backend not in ENGINES:
        raise ConfigError("distributed.backend: " + ENGINES.unknown_message(config.distributed.backend))
    return ENGINES[config.distributed.backend]


def check_parallel_config(config: Config, world_size: int) -> None:
    """Every parallelism setting that cannot work on `world_size` ranks: one ConfigError, before any work."""
    cls = engine_class(config)
    check_parallel_dims(config, world_size)
    cls.check_config(config, world_size)


def build_engine(config: Config, device: torch.device) -> Engine:
    """Check the settings, create the process group (under torchrun) and the meshes, and instantiate the
    engine named by `distributed.backend`."""
    world_size = launched_world_size()
    check_parallel_config(config, world_size)
    cls = engine_class(config)
    owns_group = init_process_group(device, config.distributed.timeout_s, always=cls.needs_process_group)
    distributed = config.distributed
    dp = world_size // (distributed.tp * distributed.pp)
    dims = ParallelDims(world_size, distributed.tp, distributed.ep, cls.replicate_degree(config, dp), distributed.pp)
    return cls(config, device, ParallelMesh(dims, device, owns_process_group=owns_group))


@dataclass
class Parallelized:
    """What `parallelize` applied, for logs and tests."""

    pipeline_stages: list[int] = field(default_factory=list)  # this rank's stages when distributed.pp > 1
    tensor_parallel: int = 1
    expert_parallel: Optional[ExpertParallel] = None
    activation_checkpointing: int = 0  # modules wrapped
    compiled_blocks: int = 0


def parallelize(model: nn.Module, config: Config, engine: Engine, build_optimizer: OptimizerFactory) -> Parallelized:
    """Apply, in order, every transformation `config` asks for to the built, initialised `model`, then
    hand it to `engine` (data parallelism) with the optimizer built over the final parameters."""
    distributed, training = config.distributed, config.training
    mesh = engine.mesh
    applied = Parallelized()
    stages = split_model(model, config, mesh.pp_rank) if distributed.pp > 1 else [(0, model)]
    for _, part in stages:
        if distributed.tp > 1:
            apply_tensor_parallel(part, mesh.tp_mesh, sequence_parallel=distributed.sequence_parallel)
            applied.tensor_parallel = distributed.tp
        if distributed.ep > 1:
            applied.expert_parallel = apply_expert_parallel(part, mesh.expert)
        applied.activation_checkpointing += apply_activation_checkpointing(part, training.activation_checkpointing)
        if training.compile:
            applied.compiled_blocks += apply_compile(part)
    if distributed.pp == 1:
        engine.wrap(model, build_optimizer)
        return applied
    parts = [part for _, part in stages]
    wrapped = engine.wrap_stages(parts, StageModules(parts), build_optimizer)
    engine.pipeline = Pipeline(config, stages, wrapped, mesh.pp_group, engine.device,
                               pipeline_micro_batches(config, global_batch_sequences(config) // engine.dp_world_size))
    applied.pipeline_stages = [stage for stage, _ in stages]
    return applied


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
    for block in layers:
        target = block if mode == "block" else block.ffn.activation
        target.forward = _checkpointed(target.forward)
    logger.info("activation checkpointing (%s) on %d modules", mode, len(layers))
    return len(layers)


def apply_compile(model: nn.Module) -> int:
    """`torch.compile` each transformer block separately (fast to compile, one graph reused by all layers
    of equal shape), and the fused cross-entropy's chunk step. Returns the number of blocks compiled."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("training.compile needs a model with a `layers` list of blocks")
    for block in layers:
        block.compile()
    head = getattr(model, "output", None)
    if hasattr(head, "compile_loss"):  # the fused cross-entropy's per-chunk softmax and loss
        head.compile_loss()
    logger.info("compiled %d transformer blocks with torch.compile", len(layers))
    return len(layers)
