"""Model FLOPs utilisation: achieved training FLOPs per second over the device's peak.

The numerator comes from `polycom_lm.models.flops.training_flops_per_token` (the configured model's real
forward+backward FLOPs, attention included, only the active experts of an MoE). The peak comes from a
table of dense bf16 / tf32 tensor-core peaks for known accelerators, or, for devices not in the table
(CPUs in particular), from matmuls timed at start-up in the run's precision: 1024³ and 2048³, best of
several repeats each (a busy core measured once can be slow by a third; about a second on a CPU), or from
`POLYCOM_LM_PEAK_FLOPS` (FLOP/s per device, e.g. `2.5e11`) where the user knows the figure: an accelerator the
table lacks, a CPU measured once for many short runs. The log says which. Should the
run's own matmul rate still beat that (MFU over 100%), the trainer raises the peak to the rate it
achieved and logs it, so MFU is never above 100%.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)

PEAK_ENVIRONMENT = "POLYCOM_LM_PEAK_FLOPS"

# Dense (no sparsity) peaks in FLOP/s per device: (name fragment, bf16 peak, fp32 peak). The fp32 peak is
# the TF32 tensor-core rate, the fastest an fp32 run can go. Vendor data sheets; SXM variants unless the
# name says PCIe. More specific fragments come first ("H100 PCIe" before "H100", "A10G" before "A10").
KNOWN_ACCELERATORS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("GH200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("H800", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),  # fp16 tensor cores; no bf16
    ("T4", 65e12, 8.1e12),
    ("MI300X", 1307e12, 654e12),
    ("MI250X", 383e12, 95.7e12),
    ("B200", 2250e12, 1100e12),
]


@dataclass(frozen=True)
class PeakFlops:
    flops_per_second: float  # per device
    source: str  # human-readable: which table entry or measurement


def lookup_peak(device_name: str, precision: str) -> float | None:
    for fragment, bf16_peak, fp32_peak in KNOWN_ACCELERATORS:
        if fragment.lower() in device_name.lower():
            return bf16_peak if precision == "bf16" else fp32_peak
    return None


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3
) -> float:
    """Best FLOP/s of square matmuls of each of `sizes` on `device` in `dtype`, best of `repeats` each: the
    faster of `torch.matmul` and the model's own projection path (`models.linear.linear`, oneDNN for fp32
    on CPU), so that MFU is measured against the fastest matmul the model could use. Draws its operands
    from a private generator: the run's RNG streams are left alone."""
    from polycom_lm.models.linear import linear, use_onednn

    generator = torch.Generator(device="cpu").manual_seed(0)
    best_rate = 0.0
    for size in sizes:
        a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        # linear(a, b) = a @ bᵀ, the same FLOPs; timed only where it is not torch.matmul's kernel again.
        matmuls = (torch.matmul, linear) if use_onednn(a, b) else (torch.matmul,)
        for matmul in matmuls:
            matmul(a, b)  # warm-up (kernel selection, allocator)
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                matmul(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best_rate = max(best_rate, 2.0 * size**3 / (time.perf_counter() - start))
    return best_rate


def peak_flops(device: torch.device, precision: str) -> PeakFlops:
    """The per-device peak that MFU is measured against, logged with where it came from."""
    given = os.environ.get(PEAK_ENVIRONMENT, "").strip()
    if given:
        result = PeakFlops(_positive_rate(given), f"{PEAK_ENVIRONMENT}={given}")
        logger.info("MFU peak: %.1f GFLOP/s per device from %s", result.flops_per_second / 1e9, result.source)
        return result
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = lookup_peak(name, precision)
        if peak is not None:
            result = PeakFlops(peak, f"{name} table peak ({precision})")
            logger.info("MFU peak: %.1f TFLOP/s from the table entry for %s", peak / 1e12, result.source)
            return result
    else:
        name = "CPU" if device.type == "cpu" else device.type
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    measured = measure_matmul_flops(device, dtype)
    result = PeakFlops(measured, f"{name} measured {dtype} matmuls 1024^3 and 2048^3, best of 3 each, of ATen and the model's linear")
    logger.info("MFU peak: %.1f GFLOP/s measured at start-up (%s)", measured / 1e9, result.source)
    return result


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"{PEAK_ENVIRONMENT}={text!r}: not a peak rate; give FLOP/s per device as a positive number, e.g. 989e12")
    return rate


def training_flops_per_token(model_config, seq_len: int) -> float:
    from polycom_lm.models.flops import training_flops_per_token as model_flops

    return float(model_flops(model_config, seq_len))
