#!/usr/bin/env python
"""The GPU measurements in one command: training steps at the paper's shapes against transformers, and
the PolyCom kernels against their memory-bandwidth limit, with the machine's own copy and matmul rates.

    PYTHONPATH=. python scripts/bench_gpu.py --json gpu.json              # about 6-8 minutes on one H200
    PYTHONPATH=. python scripts/bench_gpu.py --sections kernels           # only the activation kernels
    python scripts/bench_gpu.py --smoke                                   # tiny shapes, any device (CI, CPU)

Sections (`--sections`, comma-separated; each variant is built, warmed up, timed and freed in turn, so
peak memory is per variant):
- `machine`: device copy rate (GB/s, read + write of 1 GiB, best of 5) and bf16 matmul rate (8192³).
- `kernels` (scripts/bench_kernels.py, also runnable alone): PolyNorm and PolyReLU forward + backward
  alone at the 1B FFN activation of one 8 × 2048 batch (16384 × 8256) and at the OLMoE expert shape
  (65536 × 1536), bf16 (and fp32 at the first shape): ours (the fused Function, Triton on CUDA; PolyNorm
  also with its one-pass kernels, `triton_polycom.ONE_PASS_MAX_WIDTH`, off until this shows them faster),
  `torch.compile` of the formula, Liger-Kernel when it imports, and the seed's checkpointed version, with
  effective TB/s (5 × rows × width elements of least traffic over the time) against the copy rate.
- `loss`: the output head and its cross-entropy alone at the dense shape (scripts/bench_loss.py): the
  logits path against the fused, chunked one (`training.cross_entropy=fused`), time and memory.
- `dense`: the 1B dense model (24 × 2048, 16 heads, SwiGLU 5504 / others 8256, vocab 32000) on 4 × 2048
  tokens, bf16: our trainer step (`build_trainer(...).train_step()`, `training.compile`) for each of the
  five activations (SwiGLU and PolyNorm also with `training.cross_entropy=fused`), and transformers'
  `LlamaForCausalLM` (SDPA) in a plain loop.
- `moe`: the OLMoE shape with 4 layers (2048, 64 experts top-8, expert width 1024 / 1536, full-width QK
  norm, vocab 50304) on 4 × 2048 tokens, bf16: ours with SwiGLU, PolyNorm (also with the fused
  cross-entropy) and PolyReLU, and transformers' `OlmoeForCausalLM` (grouped_mm experts) in a plain loop.
MFU is against the table peak of the device (989 TFLOP/s dense bf16 on H100/H200) and, beside it, the
bf16 matmul rate measured in the `machine` section. Needs neither datasets, wandb nor DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "scripts"))

from polycom_lm.config import ModelConfig, MoEConfig  # noqa: E402
from polycom_lm.models.flops import training_flops_per_token  # noqa: E402
from polycom_lm.train.flops import lookup_peak  # noqa: E402
from bench_kernels import free, kernels, machine, peak_memory_gib, reset_peak_memory, time_call  # noqa: E402

ACTIVATIONS = ["relu", "gelu", "swiglu", "polyrelu", "polynorm"]
SECTIONS = ["machine", "kernels", "loss", "dense", "moe"]
FUSED_LOSS_ACTIVATIONS = ("swiglu", "polynorm")  # also timed with training.cross_entropy=fused


# ------------------------------------------------------------------------------------------ model steps


def step_arguments(args, dims: dict) -> SimpleNamespace:
    """The argument namespace bench_train's variant builders read."""
    return SimpleNamespace(device=str(args.device_name), batch=args.batch, seq_len=args.seq_len,
                           compile=args.compile, **dims)


def timed_variant(make: Callable[[], object], label: str, flops_per_token: float, args, device,
                  peak: Optional[float], measured_matmul: Optional[float]) -> Optional[dict]:
    """Build a bench_train `Variant`, run warm-up and timed steps, report tokens/s, MFU and peak memory."""
    from bench_train import train_step

    baseline = reset_peak_memory(device)
    started = time.perf_counter()
    try:
        variant = make()
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, args.vocab_in_use, (args.batch, args.seq_len), generator=generator).to(device)
        targets = torch.randint(0, args.vocab_in_use, (args.batch, args.seq_len), generator=generator).to(device)
        seconds = time_call(lambda: train_step(variant, input_ids, targets, device), device, args.warmup, args.steps)
    except Exception as failure:
        print(f"  {label}: failed ({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''})",
              flush=True)
        free(device)
        return None
    tokens = args.batch * args.seq_len
    best = tokens / min(seconds)
    row = {"variant": label, "tokens_per_s": best, "tokens_per_s_median": tokens / statistics.median(seconds),
           "mfu_table": best * flops_per_token / peak if peak else None,
           "mfu_measured_matmul": best * flops_per_token / measured_matmul if measured_matmul else None,
           "peak_memory_gib": peak_memory_gib(device, baseline), "wall_s": time.perf_counter() - started}
    mfu = f"MFU {100 * row['mfu_table']:5.1f}%" if row["mfu_table"] else ""
    mfu_measured = f"({100 * row['mfu_measured_matmul']:5.1f}% of the measured matmul)" if row["mfu_measured_matmul"] else ""
    memory = f"{row['peak_memory_gib']:6.1f} GiB" if row["peak_memory_gib"] is not None else ""
    print(f"  {label:40s} {best:10.0f} tok/s {mfu} {mfu_measured} {memory}  [{row['wall_s']:.0f} s]", flush=True)
    del variant
    free(device)
    return row


def dense(args, device, peak, measured_matmul) -> list[dict]:
    from bench_train import hf_llama, plain_variant, trainer_variant

    dims = {"hidden": args.dense_hidden, "layers": args.dense_layers, "heads": args.dense_heads,
            "ffn_hidden_size": args.dense_ffn, "vocab": args.dense_vocab}
    step_args = step_arguments(args, dims)
    args.vocab_in_use = args.dense_vocab
    rows = []
    for activation in args.activations:
        config = ModelConfig(vocab_size=args.dense_vocab, d_model=args.dense_hidden, n_layers=args.dense_layers,
                             n_heads=args.dense_heads, ffn_hidden_size=args.dense_ffn, activation=activation,
                             max_seq_len=args.seq_len, tie_embeddings=False)
        flops = training_flops_per_token(config, args.seq_len)
        row = timed_variant(lambda: trainer_variant(f"ours {activation}", config, "bf16", flops, step_args),
                            f"ours {activation} trainer step", flops, args, device, peak, measured_matmul)
        rows.extend([row] if row else [])
        if activation in FUSED_LOSS_ACTIVATIONS:  # the head and loss in chunks: no [tokens, vocab] logits kept
            row = timed_variant(
                lambda: trainer_variant(f"ours {activation}", config, "bf16", flops, step_args, cross_entropy="fused"),
                f"ours {activation} trainer step, fused CE", flops, args, device, peak, measured_matmul)
            rows.extend([row] if row else [])
    swiglu = ModelConfig(vocab_size=args.dense_vocab, d_model=args.dense_hidden, n_layers=args.dense_layers,
                         n_heads=args.dense_heads, ffn_hidden_size=args.dense_ffn, max_seq_len=args.seq_len)
    flops = training_flops_per_token(swiglu, args.seq_len)
    row = timed_variant(lambda: plain_variant("hf llama", hf_llama(step_args, device), "bf16", False, flops, True),
                        "transformers Llama (plain loop)", flops, args, device, peak, measured_matmul)
    rows.extend([row] if row else [])
    return rows


def moe_config(args, activation: str) -> ModelConfig:
    return ModelConfig(
        family="moe", vocab_size=args.moe_vocab, d_model=args.moe_hidden, n_layers=args.moe_layers,
        n_heads=args.moe_heads, activation=activation, max_seq_len=args.seq_len, qk_norm=True,
        qk_norm_scope="full", tie_embeddings=False,
        moe=MoEConfig(num_experts=args.moe_experts, top_k=args.moe_top_k, expert_hidden_size=args.moe_expert_width),
    )


def hf_olmoe(config: ModelConfig, device: torch.device):
    from transformers import OlmoeForCausalLM

    from polycom_lm.models.hf_olmoe import hf_olmoe_config

    hf_config = hf_olmoe_config(config)
    hf_config._attn_implementation = "sdpa"
    hf_config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    model = OlmoeForCausalLM(hf_config).to(device)
    with torch.no_grad():  # transformers initialises the routers to zero: give them something to route by
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.02)
    return model


def moe(args, device, peak, measured_matmul) -> list[dict]:
    from bench_train import plain_variant, trainer_variant

    step_args = step_arguments(args, {"vocab": args.moe_vocab})
    args.vocab_in_use = args.moe_vocab
    rows = []
    for activation in ("swiglu", "polynorm", "polyrelu"):
        config = moe_config(args, activation)
        flops = training_flops_per_token(config, args.seq_len)
        row = timed_variant(lambda: trainer_variant(f"ours moe {activation}", config, "bf16", flops, step_args),
                            f"ours moe {activation} trainer step", flops, args, device, peak, measured_matmul)
        rows.extend([row] if row else [])
        if activation == "polynorm":
            row = timed_variant(
                lambda: trainer_variant(f"ours moe {activation}", config, "bf16", flops, step_args, cross_entropy="fused"),
                f"ours moe {activation} trainer step, fused CE", flops, args, device, peak, measured_matmul)
            rows.extend([row] if row else [])
    config = moe_config(args, "swiglu")
    flops = training_flops_per_token(config, args.seq_len)
    row = timed_variant(lambda: plain_variant("hf olmoe", hf_olmoe(config, device), "bf16", False, flops, True),
                        "transformers OLMoE (plain loop)", flops, args, device, peak, measured_matmul)
    rows.extend([row] if row else [])
    return rows


# -------------------------------------------------------------------------------------------------- main


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS))
    parser.add_argument("--activations", default=",".join(ACTIVATIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model variant (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model variant")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="trainer steps without training.compile (faster start; not what `train` runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats: checks the script runs")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args(argv)
    args.activations = [a for a in args.activations.split(",") if a]
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    full = dict(copy_elements=1 << 28, matmul_size=8192, kernel_rows=16384, kernel_width=8256, expert_rows=65536,
                expert_width=1536, kernel_warmup=3, kernel_repeats=20, dense_hidden=2048, dense_layers=24,
                dense_heads=16, dense_ffn=5504, dense_vocab=32000, moe_hidden=2048, moe_layers=4, moe_heads=16,
                moe_experts=64, moe_top_k=8, moe_expert_width=1024, moe_vocab=50304)
    smoke = dict(copy_elements=1 << 20, matmul_size=256, kernel_rows=64, kernel_width=96, expert_rows=128,
                 expert_width=48, kernel_warmup=1, kernel_repeats=2, dense_hidden=64, dense_layers=2, dense_heads=4,
                 dense_ffn=128, dense_vocab=256, moe_hidden=64, moe_layers=2, moe_heads=4, moe_experts=8, moe_top_k=2,
                 moe_expert_width=32, moe_vocab=256)
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value)
    if args.smoke:
        args.batch, args.seq_len, args.warmup, args.steps = 2, 32, 1, 1
    args.device_name = args.device
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = lookup_peak(name, "bf16") if device.type == "cuda" else None
    measured_matmul = copy_rate = None
    if "machine" in args.sections:
        print("== machine", flush=True)
        results["machine"] = machine(args, device)
        copy_rate = results["machine"]["copy_bytes_per_s"]
        measured_matmul = results["machine"]["bf16_matmul_flops"]
    if "kernels" in args.sections:
        print("== kernels (forward + backward)", flush=True)
        results["kernels"] = kernels(args, device, copy_rate)
    if "loss" in args.sections:
        from bench_loss import measure, parse_arguments as loss_arguments

        print(f"== output head + cross-entropy alone ({args.batch} x {args.seq_len} tokens, d {args.dense_hidden}, "
              f"vocab {args.dense_vocab}, bf16)", flush=True)
        results["loss"] = measure(loss_arguments([
            "--tokens", str(args.batch * args.seq_len), "--dim", str(args.dense_hidden), "--vocab", str(args.dense_vocab),
            "--precision", "bf16", "--device", str(args.device_name), "--repeats", str(args.kernel_repeats),
        ] + ([] if args.compile else ["--no-compile"])))
    if "dense" in args.sections:
        print(f"== dense 1B shape, {args.batch} x {args.seq_len} tokens, bf16", flush=True)
        results["dense"] = dense(args, device, peak, measured_matmul)
    if "moe" in args.sections:
        print(f"== OLMoE shape, {args.moe_layers} layers, {args.batch} x {args.seq_len} tokens, bf16", flush=True)
        results["moe"] = moe(args, device, peak, measured_matmul)
    results["wall_s"] = time.perf_counter() - started
    print(f"total {results['wall_s']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
