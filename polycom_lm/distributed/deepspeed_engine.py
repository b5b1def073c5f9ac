"""The `deepspeed` engine: `deepspeed.initialize` with ZeRO stage 1, 2 or 3, configured from the YAML.

The DeepSpeed config is generated from our config (`build_deepspeed_config`): ZeRO stage, micro-batch and
accumulation sizes, bf16, gradient clipping. A user JSON (`distributed.deepspeed_config`) overrides any
generated key (nested mappings merge). Our own torch optimizer is passed in, so DeepSpeed compiles no
optimizer op, and the learning rate is still set by our schedule on `engine.optimizer.param_groups`.

How the loop's normalisation maps onto DeepSpeed:
- The loop already divides its loss by the global number of target tokens (over all micro-batches), so
  `backward` passes `scale_wrt_gas=False`: DeepSpeed must not divide by the accumulation steps again.
- The accumulation boundary is set explicitly from `micro_batch_context(is_last_micro_batch)`, so
  DeepSpeed reduces gradients on the last micro-batch and steps once per optimizer step.
- DeepSpeed clips and steps inside one call (`engine.step()`), and only it knows the global norm of its
  partitioned gradients. `clip_grad_norm` therefore runs that boundary step and returns DeepSpeed's norm;
  `optimizer_step` has nothing left to do. Consequence: a non-finite step cannot be skipped by the loop
  after the fact (the norm it sees is the one DeepSpeed already stepped with).

Checkpoints use DeepSpeed's own format in `<directory>/deepspeed/` (model, ZeRO-partitioned optimizer
state). `polycom-lm checkpoint consolidate` turns them into one safetensors model file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from polycom_lm.checkpoint.safe_load import deepspeed_loading
from polycom_lm.config import Config
from polycom_lm.distributed.engine import ENGINES, Engine, OptimizerFactory
from polycom_lm.errors import CheckpointError, ConfigError, first_line

logger = logging.getLogger(__name__)

SUPPORTED_ZERO_STAGES = (1, 2, 3)
CHECKPOINT_TAG = "deepspeed"  # DeepSpeed's files live in <step directory>/deepspeed/


def global_batch_size(config: Config) -> int:
    training = config.training
    if training.global_batch_tokens is not None:
        return training.global_batch_tokens // training.seq_len
    return training.global_batch_size


def build_deepspeed_config(config: Config, dp_world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `config` on `dp_world_size` ranks, with the user's JSON merged over it."""
    micro = config.training.micro_batch_size
    per_rank = max(global_batch_size(config) // dp_world_size, 1)
    micro = min(micro, per_rank)
    accumulation = max(per_rank // micro, 1)
    clip = config.optimizer.grad_clip_norm
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * dp_world_size,
        "zero_optimization": {"stage": config.distributed.zero_stage},
        "bf16": {"enabled": config.training.precision == "bf16"},
        "gradient_clipping": float(clip) if clip is not None else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    path = config.distributed.deepspeed_config
    if path:
        try:
            user = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"distributed.deepspeed_config: file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"distributed.deepspeed_config {path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"distributed.deepspeed_config {path}: top level must be a JSON object")
        _merge(generated, user)
    stage = generated.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage!r} (after merging {path or 'the YAML'}) is not 1, 2 or 3")
    return generated


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _skip_shared_memory_all_reduce() -> None:
    """On a CPU, DeepSpeed's communication backend compiles and loads a shared-memory all-reduce op when it
    starts (34 s of g++ on a fresh cache, measured on 2 cores) that only its inference path calls (`inference_all_reduce`):
    ZeRO training reduces through torch.distributed. Marked incompatible, the op is neither built nor loaded.
    DeepSpeed keeps the one compatibility dict it probed, so the mark holds for the process."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@ENGINES.register("deepspeed")
class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 1/2/3 data parallelism."""

    needs_process_group = True

    @classmethod
    def check_config(cls, config: Config, world_size: int) -> None:
        distributed = config.distributed
        if distributed.zero_stage not in SUPPORTED_ZERO_STAGES:
            raise ConfigError(
                f"distributed.zero_stage={distributed.zero_stage} is not a ZeRO stage; valid: "
                f"{', '.join(map(str, SUPPORTED_ZERO_STAGES))}"
            )
        for key in ("tp", "ep"):
            if getattr(distributed, key) > 1:
                raise ConfigError(
                    f"distributed.backend='deepspeed' does not compose with distributed.{key} > 1 here; "
                    f"use backend 'fsdp' or 'ddp' for {'tensor' if key == 'tp' else 'expert'} parallelism"
                )

    def __init__(self, config: Config, device: torch.device, mesh) -> None:
        super().__init__(config, device, mesh)
        import deepspeed

        if device.type == "cpu":
            _skip_shared_memory_all_reduce()
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self._engine: Optional[Any] = None
        self._stepped = False

    def wrap(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        import deepspeed

        self.deepspeed_config = build_deepspeed_config(self.config, self.dp_world_size)
        optimizer = build_optimizer(model)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.deepspeed_config
        )
        self._engine = engine
        self.module = engine.module
        self.model = engine
        # The schedule sets lr on these param_groups; DeepSpeed's wrappers share the torch optimizer's.
        self.optimizer = ds_optimizer
        logger.info(
            "deepspeed: ZeRO stage %d over %d ranks, bf16 %s",
            self.deepspeed_config["zero_optimization"]["stage"], self.dp_world_size,
            self.deepspeed_config["bf16"]["enabled"],
        )

    def micro_batch_context(self, is_last_micro_batch: bool) -> ContextManager:
        self._engine.set_gradient_accumulation_boundary(is_last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        configured = self.deepspeed_config["gradient_clipping"]
        if (max_norm or 0.0) != configured:
            logger.warning("deepspeed clips at %s (its config), not at the requested %s", configured, max_norm)
        self._engine.step()
        self._stepped = True
        norm = self._engine.get_global_grad_norm()
        return torch.as_tensor(float(norm) if norm is not None else float("nan"), dtype=torch.float32)

    def optimizer_step(self) -> None:
        if not self._stepped:
            self._engine.step()
        self._stepped = False

    def zero_grad(self) -> None:
        self._stepped = False
        self._engine.zero_grad()

    def save_checkpoint(self, directory: Path) -> None:
        self._engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load_checkpoint(self, directory: Path, trust_checkpoint: bool = False) -> None:
        if not (Path(directory) / CHECKPOINT_TAG).is_dir():
            raise CheckpointError(
                f"{directory}: no DeepSpeed checkpoint ({CHECKPOINT_TAG}/ missing); a checkpoint from another "
                "engine is loaded with that engine, or consolidated with `polycom-lm checkpoint consolidate`"
            )
        try:
            with deepspeed_loading(Path(directory), trust=trust_checkpoint):
                path, _ = self._engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError) as error:
            raise CheckpointError(
                f"{directory}: DeepSpeed could not load {CHECKPOINT_TAG}/ ({type(error).__name__}: {first_line(error)})"
            ) from None
        if path is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load {CHECKPOINT_TAG}/")
