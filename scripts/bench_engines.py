"""Losses and per-step time of every distributed engine against the single-process run, side by side.

    .venv/bin/python scripts/bench_engines.py --nproc 2 --steps 8 [--activation polynorm] [--model tiny]

Runs the same steps (fixed random global batch, AdamW, gradient accumulation over 2 micro-batches) in one
process, then each engine under torchrun on `--nproc` gloo / nccl processes, and prints a table: the
engine's losses against the single-process ones (largest relative difference) and its median step time
as a ratio to the single-process step. Timings on a shared, busy machine are noisy; the ratios are taken
in one invocation so that they at least share the conditions.

Pipeline rows (`pp2 ...`, the trainer's pipeline step with m micro-batches per step) also give the bubble:
measured as 1 − (single-process step / pp) / pp step, i.e. the share of the step a perfectly split pipeline
would not need (communication included), against the schedule's formula (p − 1) / (m + p − 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from polycom_lm.config import config_from_dict, load_config  # noqa: E402

ENGINES = {
    "ddp": ["distributed.backend=ddp"],
    "fsdp": ["distributed.backend=fsdp"],
    "fsdp bf16": ["distributed.backend=fsdp", "training.precision=bf16"],
    "fsdp tp2": ["distributed.backend=fsdp", "distributed.tp=2"],
    "ddp tp2": ["distributed.backend=ddp", "distributed.tp=2"],
    "deepspeed zero1": ["distributed.backend=deepspeed", "distributed.zero_stage=1"],
    "deepspeed zero2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
    "deepspeed zero3": ["distributed.backend=deepspeed", "distributed.zero_stage=3"],
    "pp2 1f1b m2": ["distributed.pp=2", "distributed.pp_schedule=1f1b", "distributed.pp_microbatches=2"],
    "pp2 1f1b m4": ["distributed.pp=2", "distributed.pp_schedule=1f1b", "distributed.pp_microbatches=4"],
    "pp2 1f1b m8": ["distributed.pp=2", "distributed.pp_schedule=1f1b", "distributed.pp_microbatches=8"],
    "pp2 gpipe m4": ["distributed.pp=2", "distributed.pp_schedule=gpipe", "distributed.pp_microbatches=4"],
}


def build_config(arguments, overrides: list[str]):
    base = load_config(REPOSITORY / "configs" / "model" / f"{arguments.model}.yaml")
    raw = {"model": base.to_dict()["model"],
           "training": {"seq_len": arguments.seq_len, "global_batch_size": arguments.global_batch}}
    raw["model"]["activation"] = arguments.activation
    return config_from_dict(raw, overrides)


def measure(arguments, overrides: list[str]) -> dict:
    """This process's part of one run: losses and step times (all ranks return the same losses)."""
    from polycom_lm.distributed.parallelize import build_engine, parallelize
    from polycom_lm.models import build_model

    config = build_config(arguments, overrides)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    engine = build_engine(config, device)
    torch.manual_seed(0)
    model = build_model(config.model, device=device)
    parallelize(model, config, engine, lambda module: torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1))
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.model.vocab_size, (arguments.global_batch, arguments.seq_len + 1), generator=generator)
    rows = arguments.global_batch // engine.dp_world_size
    local = batch[engine.dp_rank * rows : (engine.dp_rank + 1) * rows].to(device)
    micro_batches = min(2, rows)
    losses, times = [], []
    for _ in range(arguments.steps):
        started = time.perf_counter()
        engine.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=device)
        if engine.pipeline is not None:  # the trainer's pipeline step: its schedule runs the micro-batches
            def pipeline_losses(logits, targets):
                token_losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
                return token_losses, token_losses / batch[:, 1:].numel() * engine.dp_world_size

            loss_sum, _, _ = engine.pipeline.train_step_micro_batches(local[:, :-1], local[:, 1:], None, pipeline_losses)
            total = loss_sum / batch[:, 1:].numel()
        for index, micro in enumerate(local.chunk(micro_batches) if engine.pipeline is None else []):
            with engine.micro_batch_context(index == micro_batches - 1):
                logits = engine.model(micro[:, :-1])
                token_losses = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten(), reduction="sum")
                engine.backward(token_losses / batch[:, 1:].numel() * engine.dp_world_size)
            total += token_losses.detach().double() / batch[:, 1:].numel()
        engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        losses.append(engine.all_reduce_sum(total).item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    # The first steps pay for warm-up (allocations, DeepSpeed buckets); time the rest.
    result = {"losses": losses, "step_time_s": statistics.median(times[min(2, len(times) - 1):])}
    if engine.pipeline is not None:
        from polycom_lm.distributed.pipeline import bubble_fraction

        distributed = config.distributed
        result["bubble_formula"] = bubble_fraction(distributed.pp_schedule, distributed.pp, engine.pipeline.micro_batches)
        result["pp"] = distributed.pp
    return result


def worker(arguments) -> None:
    result = measure(arguments, arguments.overrides)
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(arguments.output).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="tiny", help="a preset in configs/model/")
    parser.add_argument("--activation", default="polynorm")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments)
        return

    single = measure(arguments, ["distributed.backend=ddp"])
    rows = [("single process", 0.0, single["step_time_s"], 1.0, single["losses"][-1], "")]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))}
    for name in arguments.engines.split(","):
        with tempfile.TemporaryDirectory() as folder:
            output = Path(folder) / "result.json"
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={arguments.nproc}",
                __file__, "--worker", "--output", str(output), "--steps", str(arguments.steps), "--model", arguments.model,
                "--activation", arguments.activation, "--seq-len", str(arguments.seq_len),
                "--global-batch", str(arguments.global_batch), "--overrides", *ENGINES[name],
            ]
            completed = subprocess.run(command, env=environment, capture_output=True, text=True)
            if completed.returncode != 0:
                print(f"{name}: failed\n{completed.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(output.read_text())
        difference = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], single["losses"]))
        bubble = ""
        if "bubble_formula" in result:
            measured = 1.0 - single["step_time_s"] / result["pp"] / result["step_time_s"]
            bubble = f"{measured:.2f} / {result['bubble_formula']:.2f}"
        rows.append((name, difference, result["step_time_s"], result["step_time_s"] / single["step_time_s"],
                     result["losses"][-1], bubble))
    print(f"model {arguments.model}, activation {arguments.activation}, {arguments.nproc} ranks, {arguments.steps} steps, "
          f"global batch {arguments.global_batch} x {arguments.seq_len} tokens, 2 micro-batches per rank")
    print(f"| engine | max rel. loss diff vs 1 process | last loss | step time (s) | time / 1 process | "
          f"pipeline bubble measured / formula |")
    print("|---|---|---|---|---|---|")
    for name, difference, step_time, ratio, last, bubble in rows:
        print(f"| {name} | {difference:.1e} | {last:.6f} | {step_time:.4f} | {ratio:.2f} | {bubble} |")


if __name__ == "__main__":
    main()
