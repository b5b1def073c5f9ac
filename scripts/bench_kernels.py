#!/usr/bin/env python
"""The PolyCom activation kernels against their memory-bandwidth limit, and the GPU timing helpers that
`bench_gpu.py` shares (its `machine` and `kernels` sections; run alone here):

    PYTHONPATH=. python scripts/bench_kernels.py                # one GPU: copy rate, then the kernels
    python scripts/bench_kernels.py --smoke                      # tiny shapes, any device

PolyNorm and PolyReLU forward + backward at the 1B FFN activation of one 8 × 2048 batch (16384 × 8256,
bf16 and fp32) and at the OLMoE expert shape (65536 × 1536, bf16): ours (`activation_impl=auto`: the fused
Function, Triton on CUDA; PolyNorm also with its one-pass kernels), `torch.compile` of the formula,
Liger-Kernel's `LigerPolyNormFunction` when it imports, and the seed's version (eager autograd inside
activation checkpointing). Effective TB/s counts the least traffic possible (read x and write y forward;
read x and dy, write dx backward: 5 × rows × width elements) over the median time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ONE_PASS_LABEL = "ours (fused, one pass)"


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(run: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run` after `warmup` untimed ones (device-synchronised)."""
    for _ in range(warmup):
        run()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def reset_peak_memory(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_gib(device: torch.device, baseline: int = 0) -> Optional[float]:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- machine


def machine(args, device: torch.device) -> dict:
    elements = args.copy_elements
    source = torch.empty(elements, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    copy = min(time_call(lambda: target.copy_(source), device, 2, 5))
    copy_rate = 2 * source.numel() * source.element_size() / copy
    size = args.matmul_size
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    matmul = min(time_call(lambda: a @ b, device, 2, 5))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "copy_bytes_per_s": copy_rate, "bf16_matmul_flops": 2 * size**3 / matmul, "matmul_size": size}
    print(f"device {result['device']}: copy {copy_rate / 1e12:.2f} TB/s (read + write of "
          f"{source.numel() * 4 / 2**30:.2f} GiB), bf16 matmul {size}^3 {result['bf16_matmul_flops'] / 1e12:.1f} TFLOP/s",
          flush=True)
    del source, target, a, b
    free(device)
    return result


# ----------------------------------------------------------------------------------------------- kernels


def kernel_variants(name: str, device: torch.device) -> dict[str, Callable]:
    """label → function (x, weight, bias) → y, each differentiable in x, weight and bias."""
    from torch.utils.checkpoint import checkpoint

    from polycom_lm.activations import build_activation
    from polycom_lm.activations.kernels import reference

    formula = reference.polynorm_reference if name == "polynorm" else reference.polyrelu_reference
    module = build_activation(name, impl="auto").to(device)

    def ours(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    compiled = torch.compile(formula)
    variants = {"ours (fused)": ours, "torch.compile of the formula": compiled}
    if name == "polynorm":
        if device.type == "cuda":  # the same Function with the one-pass Triton kernels (see one_pass_kernels)
            variants[ONE_PASS_LABEL] = ours
        variants["seed (eager + checkpoint)"] = reference.polynorm_paper_checkpointed
        try:
            from liger_kernel.ops.poly_norm import LigerPolyNormFunction

            def liger(x, weight, bias):
                try:
                    return LigerPolyNormFunction.apply(x, weight, bias.reshape(()), 1e-6, False)
                except TypeError:  # releases without the in_place argument
                    return LigerPolyNormFunction.apply(x, weight, bias.reshape(()), 1e-6)

            if device.type == "cuda":
                variants["Liger-Kernel 0.8.x"] = liger
        except ImportError:
            print("  (liger_kernel not importable: its variant is skipped)", flush=True)
    else:
        variants["seed (eager + checkpoint)"] = lambda x, w, b: checkpoint(formula, x, w, b, use_reentrant=False)
    return variants


@contextlib.contextmanager
def one_pass_kernels(enabled: bool):
    """PolyNorm's one-pass Triton kernels (whole row in registers) for every width while `enabled`."""
    if not enabled:
        yield
        return
    from polycom_lm.activations.kernels import triton_polycom

    saved = triton_polycom.ONE_PASS_MAX_WIDTH
    triton_polycom.ONE_PASS_MAX_WIDTH = 1 << 15
    try:
        yield
    finally:
        triton_polycom.ONE_PASS_MAX_WIDTH = saved


def kernels(args, device: torch.device, copy_rate: Optional[float]) -> list[dict]:
    rows = []
    shapes = [(args.kernel_rows, args.kernel_width, torch.bfloat16), (args.kernel_rows, args.kernel_width, torch.float32),
              (args.expert_rows, args.expert_width, torch.bfloat16)]
    for name in ("polynorm", "polyrelu"):
        variants = kernel_variants(name, device)
        for rows_, width, dtype in shapes:
            generator = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(rows_, width, generator=generator).to(device=device, dtype=dtype).requires_grad_()
            grad = torch.randn(rows_, width, generator=generator).to(device=device, dtype=dtype)
            weight = torch.tensor([0.3, 0.4, 0.3], device=device, requires_grad=True)
            bias = torch.tensor([0.1], device=device, requires_grad=True)
            expected = None
            for label, function in variants.items():
                def run() -> None:
                    x.grad = weight.grad = bias.grad = None
                    with one_pass_kernels(label == ONE_PASS_LABEL):
                        function(x, weight, bias).backward(grad)

                try:
                    baseline = reset_peak_memory(device)
                    seconds = statistics.median(time_call(run, device, args.kernel_warmup, args.kernel_repeats))
                    memory = peak_memory_gib(device, baseline)
                    run()
                    check = x.grad.float()
                    expected = check if expected is None else expected
                    error = ((check - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
                except Exception as failure:  # one failing variant must not lose the others' figures
                    print(f"  {name} {label} {rows_}x{width} {str(dtype)[6:]}: failed ({type(failure).__name__}: "
                          f"{str(failure).splitlines()[0] if str(failure) else ''})", flush=True)
                    continue
                traffic = 5 * x.numel() * x.element_size()
                rate = traffic / seconds
                row = {"activation": name, "variant": label, "rows": rows_, "width": width, "dtype": str(dtype)[6:],
                       "ms": 1e3 * seconds, "effective_bytes_per_s": rate,
                       "fraction_of_copy": rate / copy_rate if copy_rate else None, "peak_memory_gib": memory,
                       "dx_relative_difference_to_ours": error}
                rows.append(row)
                fraction = f"{100 * row['fraction_of_copy']:5.1f}% of copy" if copy_rate else ""
                memory_text = f"{memory:6.2f} GiB" if memory is not None else ""
                print(f"  {name:8s} {label:30s} {rows_:6d}x{width:<5d} {row['dtype']:8s} {row['ms']:8.3f} ms "
                      f"{rate / 1e12:6.2f} TB/s {fraction} {memory_text} dx diff {error:.1e}", flush=True)
            del x, grad
            free(device)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats: checks the script runs")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    sizes = (dict(copy_elements=1 << 20, matmul_size=256, kernel_rows=64, kernel_width=96, expert_rows=128,
                  expert_width=48, kernel_warmup=1, kernel_repeats=2) if args.smoke else
             dict(copy_elements=1 << 28, matmul_size=8192, kernel_rows=16384, kernel_width=8256, expert_rows=65536,
                  expert_width=1536, kernel_warmup=3, kernel_repeats=20))
    for key, value in sizes.items():
        setattr(args, key, value)
    device = torch.device(args.device)
    results = {"machine": machine(args, device)}
    results["kernels"] = kernels(args, device, results["machine"]["copy_bytes_per_s"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
