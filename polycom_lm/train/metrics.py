"""Per-log-step model metrics: PolyCom coefficients of every layer, memory, MoE statistics.

The coefficients are the scientifically interesting signal of the project: every module with
`has_coefficients = True` contributes `coefficients/<module path>/w<k>` (k = 0 multiplies the highest
power), `coefficients/<module path>/bias` and any other parameter of its own by name (PolyPReLU's
`coefficients/<module path>/negative_slope`). Under FSDP / tensor parallelism a coefficient may be a
DTensor; it is gathered (a collective, so every rank computes these metrics).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().float().cpu().reshape(-1)


def coefficient_metrics(model: torch.nn.Module) -> dict[str, float]:
    """`coefficients/<module>/w<k>` and `.../bias` for every coefficient-bearing module."""
    metrics: dict[str, float] = {}
    for name, module in model.named_modules():
        if not getattr(module, "has_coefficients", False):
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(weight, torch.Tensor):
            for index, value in enumerate(_full(weight).tolist()):
                metrics[f"coefficients/{name}/w{index}"] = value
        others = [(key, value) for key, value in module.named_parameters(recurse=False) if key not in ("weight", "bias")]
        for key, tensor in ([("bias", bias)] if isinstance(bias, torch.Tensor) else []) + others:
            values = _full(tensor).tolist()
            if len(values) == 1:
                metrics[f"coefficients/{name}/{key}"] = values[0]
            else:
                for index, value in enumerate(values):
                    metrics[f"coefficients/{name}/{key}{index}"] = value
    return metrics


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Accelerator memory (current and peak since the last call, GiB) or, on CPU, peak resident set size."""
    gib = float(2**30)
    if device.type == "cuda":
        metrics = {
            "memory/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "memory/reserved_gib": torch.cuda.memory_reserved(device) / gib,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return metrics
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak_bytes = peak_rss if sys.platform == "darwin" else peak_rss * 1024
    return {"memory/peak_rss_gib": peak_bytes / gib}


def model_metrics(model: torch.nn.Module, device: torch.device, coefficients: bool = True) -> dict[str, Any]:
    """Coefficients (when `coefficients`), memory and MoE routing metrics of the plain `model`."""
    metrics: dict[str, Any] = {}
    if coefficients:
        metrics.update(coefficient_metrics(model))
    metrics.update(memory_metrics(device))
    moe_metrics = getattr(model, "moe_metrics", None)
    if callable(moe_metrics):
        metrics.update(
            {key if key.startswith("moe/") else f"moe/{key}": float(value) for key, value in moe_metrics().items()}
        )
    return metrics
