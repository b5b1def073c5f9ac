#!/usr/bin/env python
"""Forward+backward time and bytes saved for backward of every registered activation, alone and inside
a full FFN block at matched parameters, side by side in one run.

    python scripts/bench_activations.py                        # hidden 1024, 4096 tokens, fp32 and bf16
    python scripts/bench_activations.py --tokens 1024 --repeats 3 --dtypes fp32
    python scripts/bench_activations.py --json bench.json      # also write every measurement

Baselines: PolyNorm as plain autograd of the formula (`polynorm[reference]`) and as published by the
PolyCom reference repository (eager, wrapped in activation checkpointing: `polynorm[paper-ckpt]`).
The FFN widths follow the paper's parameter matching: SwiGLU / GEGLU use `--ffn-hidden-size` with a 2×
wide in-proj, the others 3/2 of it, so every block has 3 · hidden · ffn_hidden_size weights.

Times are the best of `--repeats` rounds (other processes only ever add time); in each round every
variant runs once, interleaved, so that load from other processes affects all of them alike. Ratios are the numbers to compare across machines.
On CUDA the device is synchronised around each measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polycom_lm.activations import ACTIVATIONS, build_activation  # noqa: E402
from polycom_lm.activations.kernels.reference import polynorm_paper_checkpointed  # noqa: E402
from polycom_lm.activations.saved_memory import saved_tensor_bytes  # noqa: E402
from polycom_lm.config import ModelConfig  # noqa: E402
from polycom_lm.models.feedforward import FeedForward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
POLYCOM = tuple(sorted(name for name, cls in ACTIVATIONS.items() if cls.has_coefficients))  # every impl of each


class PaperCheckpointedPolyNorm(nn.Module):
    """The reference repository's PolyNorm (checkpointed eager formula), as a drop-in activation."""

    gated = False

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((3,), 1 / 3))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return polynorm_paper_checkpointed(x, self.weight, self.bias)


@dataclasses.dataclass
class Variant:
    label: str  # e.g. "polynorm[compiled]"
    name: str  # registry name
    build: Callable[[], nn.Module]


def variants(names: list[str], impls: list[str]) -> list[Variant]:
    result = []
    for name in names:
        if name in POLYCOM:
            for impl in impls:
                result.append(Variant(f"{name}[{impl}]", name, lambda n=name, i=impl: build_activation(n, impl=i)))
            if name == "polynorm":
                if "reference" not in impls:
                    result.append(Variant("polynorm[reference]", name, lambda: build_activation("polynorm", impl="reference")))
                result.append(Variant("polynorm[paper-ckpt]", name, PaperCheckpointedPolyNorm))
        else:
            result.append(Variant(name, name, lambda n=name: build_activation(n)))
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).backward(grad)


def ffn_block(name: str, activation: nn.Module, args, dtype, device) -> nn.Module:
    config = ModelConfig(d_model=args.hidden, ffn_hidden_size=args.ffn_hidden_size, activation=name)
    block = FeedForward(config)
    block.activation = activation
    block.init_weights(0.02, 0.02)
    return block.to(device=device, dtype=dtype)


def measure(variant_list: list[Variant], args, dtype: torch.dtype, device: torch.device, kind: str, rows: int, width=None):
    """Time and saved bytes of each variant; `kind` is "alone" (activation on [rows, in-width]) or
    "block" (FFN on [rows, hidden])."""
    setups = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    for variant in variant_list:
        activation = variant.build().to(device=device, dtype=torch.float32)
        if kind == "alone":
            cls = ACTIVATIONS[variant.name]
            out_width = width if width is not None else cls.parameter_matched_width(args.ffn_hidden_size)
            module, in_features = activation, cls.in_width(out_width)
        else:
            module = ffn_block(variant.name, activation, args, dtype, device)
            in_features, out_width = args.hidden, args.hidden
        x = torch.randn(rows, in_features, generator=generator).to(device=device, dtype=dtype).requires_grad_()
        grad = torch.randn(rows, out_width, generator=generator).to(device=device, dtype=dtype)
        parameters = list(module.parameters())
        saved = saved_tensor_bytes(lambda: module(x), exclude=parameters)
        for _ in range(args.warmup):
            forward_backward(module, x, grad)
        setups.append((variant, module, x, grad, saved))
    times: dict[str, list[float]] = {variant.label: [] for variant in variant_list}
    for _ in range(args.repeats):
        for variant, module, x, grad, _ in setups:
            synchronize(device)
            start = time.perf_counter()
            forward_backward(module, x, grad)
            synchronize(device)
            times[variant.label].append(time.perf_counter() - start)
    return {
        variant.label: {"ms": 1e3 * min(times[variant.label]), "saved_bytes": saved}
        for variant, _, _, _, saved in setups
    }


def print_table(title: str, results: dict, baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'variant':24s} {'fwd+bwd ms':>11s} {'x ' + baseline:>22s} {'saved MiB':>10s} {'x ' + baseline:>22s}")
    base = results.get(baseline)
    for label, entry in results.items():
        time_ratio = f"{entry['ms'] / base['ms']:.2f}" if base else "-"
        bytes_ratio = f"{entry['saved_bytes'] / base['saved_bytes']:.2f}" if base and base["saved_bytes"] else "-"
        print(f"{label:24s} {entry['ms']:11.2f} {time_ratio:>22s} {entry['saved_bytes'] / 2**20:10.1f} {bytes_ratio:>22s}")


def best_polynorm(results: dict) -> str:
    fast = [label for label in results if label.startswith("polynorm[") and label not in ("polynorm[reference]", "polynorm[paper-ckpt]")]
    return min(fast, key=lambda label: results[label]["ms"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="model width d_model")
    parser.add_argument("--ffn-hidden-size", type=int, default=2752, help="gated (SwiGLU) FFN width; others get 3/2 of it")
    parser.add_argument("--tokens", type=int, default=4096, help="rows per forward")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--names", default=",".join(sorted(ACTIVATIONS)), help="registered activations to run")
    parser.add_argument("--impls", default="fused,compiled", help="implementations of polynorm / polyrelu / poly")
    parser.add_argument("--alone-shape", default="8192x2048", help="ROWSxWIDTH for the PolyNorm-alone speed-up ('' to skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write all measurements here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    names = [n for n in args.names.split(",") if n]
    impls = [i for i in args.impls.split(",") if i]
    variant_list = variants(names, impls)
    print(
        f"device {device} ({torch.get_num_threads()} threads), hidden {args.hidden}, tokens {args.tokens}, "
        f"SwiGLU width {args.ffn_hidden_size}, non-gated width "
        f"{ACTIVATIONS['polynorm'].parameter_matched_width(args.ffn_hidden_size)}, "
        f"best of {args.repeats} interleaved rounds after {args.warmup} warm-up"
    )
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for dtype_name in [d for d in args.dtypes.split(",") if d]:
        dtype = DTYPES[dtype_name]
        alone = measure(variant_list, args, dtype, device, "alone", args.tokens)
        block = measure(variant_list, args, dtype, device, "block", args.tokens)
        report["results"][dtype_name] = {"alone": alone, "block": block}
        print_table(f"[{dtype_name}] activation alone, {args.tokens} rows (ratios to the paper's checkpointed PolyNorm)", alone, "polynorm[paper-ckpt]")
        print_table(f"[{dtype_name}] FFN block, {args.tokens} tokens x hidden {args.hidden} (ratios to SwiGLU)", block, "swiglu")
        if "swiglu" in block and any(k.startswith("polynorm[") for k in block):
            best = best_polynorm(block)
            print(
                f"target [{dtype_name}] {best} FFN block / SwiGLU block: time {block[best]['ms'] / block['swiglu']['ms']:.2f}x, "
                f"saved bytes {block[best]['saved_bytes'] / block['swiglu']['saved_bytes']:.2f}x"
            )
    if args.alone_shape and "polynorm" in names:
        rows, width = (int(v) for v in args.alone_shape.lower().split("x"))
        polynorm_variants = [v for v in variant_list if v.name == "polynorm"]
        alone = measure(polynorm_variants, args, torch.float32, device, "alone", rows, width)
        report["results"]["polynorm_alone_fp32"] = alone
        print_table(f"[fp32] PolyNorm alone at [{rows}, {width}] (ratios to the paper's checkpointed PolyNorm)", alone, "polynorm[paper-ckpt]")
        best = best_polynorm(alone)
        print(f"target [fp32] {best} speed-up over the checkpointed reference: {alone['polynorm[paper-ckpt]']['ms'] / alone[best]['ms']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
