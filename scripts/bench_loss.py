#!/usr/bin/env python
"""The output head and its cross-entropy alone, forward + backward: the logits path against the fused,
chunked path (`training.cross_entropy=fused`, models/lm_head.py), side by side in one run.

    PYTHONPATH=. python scripts/bench_loss.py                       # CPU: 2048 tokens, d 512, vocab 32000
    PYTHONPATH=. python scripts/bench_loss.py --tokens 16384 --dim 2048 --precision bf16   # a GPU, 1B shape

For each variant: the best and median time of `--repeats` interleaved rounds, the bytes kept from the
forward to the backward (tensors saved for backward, parameters and inputs excluded: the logits path's
float32 log-probabilities [tokens, vocab], the fused path's input and weight gradients), and on CUDA the
peak memory above the inputs. Variants: `logits` (F.linear then F.cross_entropy on float32 logits, as
`training.cross_entropy=logits` runs it), `logits compiled` (the trainer's compiled loss), `fused` (chunks
of `--chunk` tokens) and `fused compiled` (its per-chunk step compiled, as `training.compile` does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polycom_lm.activations.saved_memory import saved_tensor_bytes  # noqa: E402
from polycom_lm.models.lm_head import chunk_loss_and_logit_grad, linear_cross_entropy  # noqa: E402
from polycom_lm.train.loop import token_loss_sum  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> list[dict]:
    """Time, memory, loss and gradient difference of each variant; prints the table, returns its rows."""
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.dim, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=generator) * args.dim**-0.5).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    compiled_loss = torch.compile(token_loss_sum)
    compiled_chunk = torch.compile(chunk_loss_and_logit_grad)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def logits_path(loss_fn):
        def run():
            with autocast():
                logits = F.linear(x, weight)
            return loss_fn(logits.unsqueeze(0), targets.unsqueeze(0))
        return run

    def fused_path(chunk_fn):
        def run():
            with autocast():
                return linear_cross_entropy(x, weight, targets, args.chunk, chunk_fn)
        return run

    variants = {"logits": logits_path(token_loss_sum), "fused": fused_path(chunk_loss_and_logit_grad)}
    if args.compile:
        variants["logits compiled"] = logits_path(compiled_loss)
        variants["fused compiled"] = fused_path(compiled_chunk)

    def step(run):
        x.grad = weight.grad = None
        run().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses, grads, kept, peaks = {}, {}, {}, {}
    for label, run in variants.items():
        step(run)  # warm-up (and compilation); leaves this variant's gradients
        grads[label] = (x.grad.clone(), weight.grad.clone())
        kept[label] = saved_tensor_bytes(run, exclude=(x, weight))
        with torch.no_grad():
            losses[label] = run().item()
        if device.type == "cuda":
            x.grad = weight.grad = None
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(run)
            peaks[label] = torch.cuda.max_memory_allocated(device) - base
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits every variant alike
        for label, run in variants.items():
            started = time.perf_counter()
            step(run)
            times[label].append(time.perf_counter() - started)

    print(f"device {device} ({torch.get_num_threads()} threads), {args.precision}: {args.tokens} tokens, d {args.dim}, "
          f"vocab {args.vocab}, chunk {args.chunk}; best / median of {args.repeats} interleaved rounds")
    print("| variant | best ms | median ms | time / logits | kept for backward (MB) | CUDA peak (MB) | loss | max grad diff vs logits |")
    print("|---|---|---|---|---|---|---|---|")
    base = min(times["logits"])
    rows = []
    for label in variants:
        difference = max((a - b).abs().max().item() for a, b in zip(grads[label], grads["logits"]))
        peak = f"{peaks[label] / 1e6:.0f}" if label in peaks else "-"
        print(f"| {label} | {1e3 * min(times[label]):.1f} | {1e3 * statistics.median(times[label]):.1f} | "
              f"{min(times[label]) / base:.2f} | {kept[label] / 1e6:.1f} | {peak} | {losses[label]:.6f} | {difference:.1e} |")
        rows.append({"variant": label, "best_s": min(times[label]), "median_s": statistics.median(times[label]),
                     "time_vs_logits": min(times[label]) / base, "kept_for_backward_bytes": kept[label],
                     "cuda_peak_bytes": peaks.get(label), "loss": losses[label], "max_grad_diff_vs_logits": difference})
    return rows


def main(argv=None) -> int:
    measure(parse_arguments(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
