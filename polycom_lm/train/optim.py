"""AdamW with parameter groups, and the learning-rate schedules.

Parameter groups (each with its own weight decay from `OptimizerConfig`):
- `activation`: parameters of modules with `has_coefficients = True` (PolyNorm / PolyReLU coefficients
  `weight` [r] and `bias`) → `weight_decay_activation`;
- `embeddings`: `nn.Embedding` weights (and an output head tied to them) → `weight_decay_embeddings`;
- `norms_biases`: every other parameter with fewer than 2 dimensions (norm gains, biases) →
  `weight_decay_norms`;
- `matrices`: everything else (linear weights, the untied output head) → `weight_decay`.

Schedules map training progress to a multiplier of the peak `optimizer.lr`. Progress is measured in steps
or in tokens (`schedule.units`); warmup rises linearly from lr/warmup to lr, so the first update already
moves the weights (or from `warmup_start_ratio` · lr, OLMo's 0.1). Cosine and linear decay end at
`decay_steps` / `decay_tokens` when set (possibly beyond the run, as in OLMoE), else at the run's end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from polycom_lm.config import OptimizerConfig, ScheduleConfig

logger = logging.getLogger(__name__)

GROUP_NAMES = ("matrices", "norms_biases", "embeddings", "activation")


def classify_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split the trainable parameters of `model` into the four groups (each parameter exactly once)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_NAMES}
    assigned: set[int] = set()

    def add(group: str, name: str, parameter: nn.Parameter) -> None:
        if id(parameter) in assigned or not parameter.requires_grad:
            return
        assigned.add(id(parameter))
        groups[group].append((name, parameter))

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if getattr(module, "has_coefficients", False):
            for name, parameter in module.named_parameters(prefix=module_name):
                add("activation", name, parameter)
        elif isinstance(module, nn.Embedding):
            add("embeddings", prefix + "weight", module.weight)
    for name, parameter in model.named_parameters():
        add("norms_biases" if parameter.ndim < 2 else "matrices", name, parameter)
    return groups


def parameter_groups(model: nn.Module, config: OptimizerConfig) -> list[dict]:
    decay = {
        "matrices": config.weight_decay,
        "norms_biases": config.weight_decay_norms,
        "embeddings": config.weight_decay_embeddings,
        "activation": config.weight_decay_activation,
    }
    groups = []
    for name, members in classify_parameters(model).items():
        if members:
            groups.append(
                {"name": name, "params": [p for _, p in members], "weight_decay": decay[name]}
            )
    return groups


def _fused_supported(parameters: list[torch.Tensor]) -> bool:
    # Fused AdamW works on plain CUDA and (since torch 2.4) CPU tensors; DTensor shards use foreach.
    from torch.distributed.tensor import DTensor

    return all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
        for p in parameters
    )


def _is_dtensor(parameter: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameter groups; fused when `config.fused` is None and the device allows."""
    groups = parameter_groups(model, config)
    parameters = [p for group in groups for p in group["params"]]
    fused = _fused_supported(parameters) if config.fused is None else config.fused
    # Foreach kernels cannot mix DTensors with plain tensors (expert-parallel shards beside FSDP-replicated
    # parameters of a pipeline stage): those take the per-parameter loop.
    mixed = len({_is_dtensor(p) for p in parameters}) > 1
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.betas[0], config.betas[1]),
        eps=config.eps,
        fused=fused,
        foreach=None if fused else not mixed,
    )
    counts = ", ".join(f"{g['name']} {sum(p.numel() for p in g['params']):,}" for g in groups)
    logger.info("AdamW (%s): parameters per group: %s", "fused" if fused else "foreach", counts)
    return optimizer


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier as a function of progress.

    `progress` is the number of the update being made (1 for the first update) in steps, or the number of
    tokens seen once this update's batch is counted, in tokens; `total` is the same quantity at the end
    of training.
    """

    name: str
    warmup: int
    decay: int  # wsd: the final decay's length; cosine / linear: where the decay ends (0: at `total`)
    total: int
    min_ratio: float
    warmup_start: float = 0.0  # the multiplier warmup rises from (progress 0)

    def multiplier(self, progress: int) -> float:
        if self.warmup > 0 and progress < self.warmup:
            if self.warmup_start > 0:
                return self.warmup_start + (1.0 - self.warmup_start) * progress / self.warmup
            return progress / self.warmup
        if self.name == "constant":
            return 1.0
        if self.name == "wsd":
            decay_start = self.total - self.decay
            if progress <= decay_start:
                return 1.0
            fraction = min(1.0, (progress - decay_start) / max(1, self.decay))
            return 1.0 - (1.0 - self.min_ratio) * fraction
        end = self.decay if self.decay > 0 else self.total
        fraction = min(1.0, max(0.0, (progress - self.warmup) / max(1, end - self.warmup)))
        if self.name == "linear":
            return 1.0 - (1.0 - self.min_ratio) * fraction
        if self.name == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * fraction))
        raise ValueError(f"unknown schedule {self.name!r}")


def build_schedule(config: ScheduleConfig, max_steps: int, tokens_per_step: int) -> Schedule:
    start = config.warmup_start_ratio
    if config.units == "tokens":
        return Schedule(
            config.name, config.warmup_tokens, config.decay_tokens, max_steps * tokens_per_step, config.lr_min_ratio,
            start,
        )
    return Schedule(config.name, config.warmup_steps, config.decay_steps, max_steps, config.lr_min_ratio, start)


def schedule_progress(config: ScheduleConfig, step: int, tokens_per_step: int) -> int:
    """Progress of update number `step` (1-based) in the schedule's units."""
    return step * tokens_per_step if config.units == "tokens" else step


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
