#!/usr/bin/env python
"""The GPU measurements in one command: training steps at the paper's shapes against transformers, and
the PolyCom kernels against their memory-bandwidth limit, with the machine's own copy and matmul rates.

    PYTHONPATH=. python scripts/bench_gpu.py --json gpu.json              # about 6-8 minutes on one H200
    PYTHONPATH=. python scripts/bench_gpu.py --sections kernels           # only the activation kernels
    python scripts/bench_gpu.py --smoke                                   # tiny shapes, any device (CI, CPU)

Sections (`--sections`, comma-separated; each variant is built, warmed up, timed and freed in turn, so
peak memory is per variant):
- `machine`: device copy rate (GB/s, read + write of 1 GiB, best of 5) and bf16 matmul rate (8192³).
- `kernels`: PolyNorm and PolyReLU forward + backward alone at the 1B FFN activation of one 8 × 2048 batch
  (16384 × 8256) and at the OLMoE expert shape (65536 × 1536), bf16 (and fp32 at the first shape): ours
  (`activation_impl=auto`: the fused Function with Triton on CUDA; PolyNorm also with its one-pass kernels,
  `triton_polycom.ONE_PASS_MAX_WIDTH`, off until this shows them faster), `torch.compile` of the formula,
  Liger-Kernel's `LigerPolyNormFunction` when `liger_kernel` imports, and the seed's version (eager
  autograd inside activation checkpointing). Effective TB/s counts the least traffic possible (read x and
  write y forward; read x and dy, write dx backward: 5 × rows × width elements) over the measured time.
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
import contextlib
import gc
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

ACTIVATIONS = ["relu", "gelu", "swiglu", "polyrelu", "polynorm"]
SECTIONS = ["machine", "kernels", "loss", "dense", "moe"]
ONE_PASS_LABEL = "ours (fused, one pass)"
FUSED_LOSS_ACTIVATIONS = ("swiglu", "polynorm")  # also timed with training.cross_entropy=fused


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
