#!/usr/bin/env python
"""Training-step throughput (forward, backward, AdamW) of our dense model against transformers'
`LlamaForCausalLM` of identical dimensions, side by side in one run, with MFU against a matmul measured
in the same run.

    python scripts/bench_train.py                                   # every group below
    python scripts/bench_train.py --groups llama --steps 4          # only the Llama comparison
    python scripts/bench_train.py --activations relu,gelu,swiglu,polyrelu,polynorm --json train.json

Groups (each group's variants run interleaved, one step each per round, so that load from other
processes hits them alike; a variant's figure is its best step after the warm-up steps):
- `llama`: transformers' Llama and ours, fp32 and bf16 autocast, in a plain PyTorch loop (AdamW with
  default settings), eager and with `torch.compile` of the whole model; and ours with the trainer's
  step as `polycom-lm train` runs it (`build_trainer(...).train_step()` with `training.compile`: compiled
  transformer blocks and loss, fused AdamW with the trainer's parameter groups, gradient clipping). On CPU
  also ours in fp32 with `model.linear_impl=aten` (F.linear/MKL instead of the oneDNN projections), and a
  ceiling: the step's FLOPs at the best matmul rate measured, the most any implementation could reach.
- `activations`: ours with each activation at matched parameters (the paper's 3/2 width rule), with the
  trainer's step, fp32.
Default size: hidden 512, 8 layers, 8 heads, SwiGLU width 1376, vocab 8192, untied, batch 8 × 256.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polycom_lm.config import (  # noqa: E402
    Config, DataConfig, DataSourceConfig, ModelConfig, OptimizerConfig, ScheduleConfig, TrainingConfig,
)
from polycom_lm.models import build_model  # noqa: E402
from polycom_lm.models.flops import count_parameters, training_flops_per_token  # noqa: E402
from polycom_lm.models.hf_interop import hf_llama_config  # noqa: E402
from polycom_lm.train.flops import measure_matmul_flops  # noqa: E402
from polycom_lm.train.run import build_trainer  # noqa: E402


@dataclasses.dataclass
class Variant:
    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    precision: str  # fp32 | bf16 (autocast)
    forward: Callable[[torch.Tensor], torch.Tensor]  # input_ids → logits
    clip: Optional[float]  # gradient clipping as the trainer does it, or None
    flops_per_token: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    trainer: Optional[object] = None  # a polycom_lm Trainer: its own train_step replaces the plain one


def model_config(args, activation: str = "swiglu", impl: str = "auto", linear_impl: str = "auto") -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        d_model=args.hidden,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_hidden_size=args.ffn_hidden_size,
        activation=activation,
        activation_impl=impl,
        linear_impl=linear_impl,
        max_seq_len=args.seq_len,
        tie_embeddings=False,
    )


def hf_llama(args, device) -> nn.Module:
    from transformers import LlamaForCausalLM

    config = hf_llama_config(model_config(args))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(variant: Variant, input_ids: torch.Tensor, targets: torch.Tensor, device: torch.device) -> None:
    if variant.trainer is not None:
        variant.trainer.train_step()
        return
    with autocast(variant.precision, device):
        logits = variant.forward(input_ids)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    if variant.clip is not None:
        torch.nn.utils.clip_grad_norm_(variant.model.parameters(), variant.clip)
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def plain_variant(label, model, precision, compiled, flops_per_token, hf: bool) -> Variant:
    """A plain PyTorch loop: AdamW with default settings, optionally `torch.compile` of the whole model."""
    call = torch.compile(model) if compiled else model
    forward = (lambda ids: call(input_ids=ids).logits) if hf else call
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Variant(label, model, optimizer, precision, forward, None, flops_per_token)


class FixedBatch:
    """A dataset whose every global batch is the same [batch, seq_len + 1] tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def global_batch(self, consumed_samples: int, global_batch_size: int, rank: int, world_size: int) -> dict:
        return {"input_ids": self.tokens[:global_batch_size]}


def trainer_variant(label, model_config_, precision, flops_per_token, args, cross_entropy: str = "logits") -> Variant:
    """What `polycom-lm train` runs: `build_trainer(config, dataset).train_step()` with `training.compile`
    (compiled blocks and loss), fused AdamW over the trainer's parameter groups, clipping, the loop's
    loss normalisation and its one host sync per step."""
    config = Config(
        model=model_config_,
        data=DataConfig(train=[DataSourceConfig(source="unused")]),
        optimizer=OptimizerConfig(lr=1e-4),
        schedule=ScheduleConfig(name="constant", warmup_steps=0),
        training=TrainingConfig(seq_len=args.seq_len, global_batch_size=args.batch, micro_batch_size=args.batch,
                                precision=precision, compile=getattr(args, "compile", True), max_steps=10**6,
                                device=args.device, cross_entropy=cross_entropy),
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator)
    trainer = build_trainer(config, FixedBatch(tokens), device=torch.device(args.device))
    engine = trainer.engine
    return Variant(label, engine.unwrapped_model(), engine.optimizer, precision, engine.model, None, flops_per_token,
                   trainer=trainer)


def best_matmul_flops(device, dtype) -> float:
    """The best square-matmul rate at 1024³ and 2048³ (each the faster of ATen and the model's oneDNN
    projection path): the most demanding reference MFU and the ceiling below are measured against."""
    return max(measure_matmul_flops(device, dtype, sizes=(size,), repeats=reps) for size, reps in ((1024, 10), (2048, 3)))


def run_group(variants: list[Variant], args, device) -> None:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
    for variant in variants:  # warm-up: compilation, allocator, optimizer state
        start = time.perf_counter()
        for _ in range(args.warmup):
            train_step(variant, input_ids, targets, device)
        print(f"  warm-up {variant.label}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.steps):
        for variant in variants:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train_step(variant, input_ids, targets, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            variant.step_seconds.append(time.perf_counter() - start)


def report(variants: list[Variant], args, matmul: dict[str, float], baseline: str) -> list[dict]:
    tokens = args.batch * args.seq_len
    base = next((v for v in variants if v.label == baseline), None)
    rows = []
    print(f"{'variant':46s} {'tokens/s':>9s} {'median':>9s} {'x ' + baseline:>24s} {'MFU':>6s}")
    for variant in variants:
        best = tokens / min(variant.step_seconds)
        median = tokens / statistics.median(variant.step_seconds)
        ratio = best / (tokens / min(base.step_seconds)) if base else float("nan")
        mfu = best * variant.flops_per_token / matmul[variant.precision]
        print(f"{variant.label:46s} {best:9.0f} {median:9.0f} {ratio:24.2f} {100 * mfu:5.1f}%")
        rows.append({"variant": variant.label, "tokens_per_s_best": best, "tokens_per_s_median": median,
                     "ratio": ratio, "mfu": mfu})
    return rows


def llama_group(args, device) -> list[Variant]:
    ours_config = model_config(args)
    flops = training_flops_per_token(ours_config, args.seq_len)
    variants = []
    for precision in args.precisions:
        torch.manual_seed(0)
        variants.append(plain_variant(f"hf-llama {precision} eager (plain loop)", hf_llama(args, device), precision, False, flops, True))
        torch.manual_seed(0)
        variants.append(plain_variant(f"ours {precision} eager (plain loop)", build_model(ours_config, device), precision, False, flops, False))
        if precision == "fp32" and device.type == "cpu":  # what the oneDNN projections (models/linear.py) bring
            torch.manual_seed(0)
            aten_config = model_config(args, linear_impl="aten")
            variants.append(plain_variant("ours fp32 eager (plain loop, linear_impl=aten)", build_model(aten_config, device),
                                          precision, False, flops, False))
        if args.compile and args.plain_compile:
            variants.append(plain_variant(f"hf-llama {precision} torch.compile (plain loop)", hf_llama(args, device), precision, True, flops, True))
            variants.append(plain_variant(f"ours {precision} torch.compile (plain loop)", build_model(ours_config, device), precision, True, flops, False))
        if args.compile:
            variants.append(trainer_variant(f"ours {precision} trainer step", ours_config, precision, flops, args))
    return variants


def activations_group(args, device) -> list[Variant]:
    variants = []
    for activation in args.activations:
        config = model_config(args, activation)
        flops = training_flops_per_token(config, args.seq_len)
        torch.manual_seed(0)
        label = f"ours {activation} fp32 " + ("trainer step" if args.compile else "eager (plain loop)")
        if args.compile:
            variants.append(trainer_variant(label, config, "fp32", flops, args))
        else:
            variants.append(plain_variant(label, build_model(config, device), "fp32", False, flops, False))
        model = variants[-1].model
        print(f"  {activation}: {count_parameters(model)['total']:,} parameters")
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn-hidden-size", type=int, default=1376, help="SwiGLU width; non-gated get 3/2 of it")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--activations", default="relu,gelu,swiglu,polyrelu,polynorm")
    parser.add_argument("--groups", default="llama,activations")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip every compiled variant")
    parser.add_argument("--no-plain-compile", dest="plain_compile", action="store_false",
                        help="skip torch.compile of the whole model in the plain loop (keeps the trainer step)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.activations = [a for a in args.activations.split(",") if a]
    device = torch.device(args.device)
    matmul = {"fp32": best_matmul_flops(device, torch.float32), "bf16": best_matmul_flops(device, torch.bfloat16)}
    print(
        f"device {device} ({torch.get_num_threads()} threads); batch {args.batch} x {args.seq_len} tokens; "
        f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads, SwiGLU width {args.ffn_hidden_size}, "
        f"vocab {args.vocab}; best of {args.steps} interleaved steps after {args.warmup} warm-up\n"
        f"matmul (best of 1024^3 and 2048^3, ATen and oneDNN) measured now: fp32 {matmul['fp32'] / 1e9:.1f} GFLOP/s, bf16 {matmul['bf16'] / 1e9:.1f} GFLOP/s "
        f"(MFU is against the best rate measured during the run, re-measured after each group)",
        flush=True,
    )
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "matmul_flops": matmul}
    for group in [g for g in args.groups.split(",") if g]:
        print(f"\n== {group}", flush=True)
        variants = {"llama": llama_group, "activations": activations_group}[group](args, device)
        run_group(variants, args, device)
        # Other processes only ever slow the matmul down: keep the best rate seen during the run.
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            matmul[precision] = max(matmul[precision], best_matmul_flops(device, dtype))
        baseline = "hf-llama fp32 eager (plain loop)" if group == "llama" else variants[0].label
        for activation_variant in variants:
            if "swiglu" in activation_variant.label and group == "activations":
                baseline = activation_variant.label
        print(f"matmul best so far: fp32 {matmul['fp32'] / 1e9:.1f} GFLOP/s, bf16 {matmul['bf16'] / 1e9:.1f} GFLOP/s")
        results[group] = report(variants, args, matmul, baseline)
        if group == "llama":
            by_label = {row["variant"]: row for row in results[group]}
            for precision in args.precisions:
                hf = by_label.get(f"hf-llama {precision} eager (plain loop)")
                if hf:  # every FLOP of the step at the best matmul rate: the most any implementation can reach
                    ceiling = matmul[precision] / training_flops_per_token(model_config(args), args.seq_len)
                    print(f"ceiling: {precision} step at the matmul rate = {ceiling:.0f} tok/s = "
                          f"{ceiling / hf['tokens_per_s_best']:.2f}x hf-llama {precision} eager")
                for mine in (f"ours {precision} eager (plain loop)", f"ours {precision} trainer step"):
                    if hf and mine in by_label:
                        print(f"target: {mine} / hf-llama {precision} eager: "
                              f"{by_label[mine]['tokens_per_s_best'] / hf['tokens_per_s_best']:.2f}x")
        del variants
        gc.collect()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
