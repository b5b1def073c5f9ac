#!/usr/bin/env python
"""How long a checkpoint stops training: synchronous against asynchronous saves (`training.async_checkpoint`),
side by side in one run, through `polycom-lm train`'s own save path.

    PYTHONPATH=. python scripts/bench_checkpoint.py                  # ~150M parameters: ~1.8 GB per save
    PYTHONPATH=. python scripts/bench_checkpoint.py --d-model 512 --layers 4 --steps 4   # quick

Both modes train the same model (the quickstart's data, `builtin:pydoc`) for `--steps` steps with a save
after every `--save-every` steps, one mode after the other, `--rounds` times interleaved. Per save it
records the stall: how long `Trainer.save_checkpoint` kept the training loop from its next step (for the
asynchronous mode that includes waiting for the previous save, if it was still being written). It also
records, for the asynchronous mode, how long each background write took, the median time of the steps
with no save before them and of those right after a save (beside a background write, which competes
for the same cores and memory bandwidth), and the whole training's wall time (first step to the last
write's end): what the stalls add up to. Prints a table, the ratio sync stall / async stall and the ratio
of the training times; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polycom_lm.config import load_config  # noqa: E402
from polycom_lm.train import run_training  # noqa: E402
from polycom_lm.train.loop import Callback, Trainer  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the measured rows to this file")
    return parser.parse_args(argv)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.step_s: dict[int, float] = {}
        self._start = 0.0
        self.first_start: float | None = None
        self.end = 0.0

    def on_step_start(self, trainer: Trainer) -> None:
        self._start = time.perf_counter()
        self.first_start = self.first_start or self._start

    def on_train_end(self, trainer: Trainer) -> None:  # after the last save (the async one: waited for below)
        self.end = time.perf_counter()

    def on_step_end(self, trainer: Trainer) -> None:  # before the checkpoint callback's save of this step
        self.step_s[trainer.state.step] = time.perf_counter() - self._start


def run_mode(args: argparse.Namespace, folder: Path, asynchronous: bool, stalls: list[float], writes: list[float],
             steps: int | None = None) -> dict:
    overrides = [
        f"training.output_dir={folder}", f"training.max_steps={steps or args.steps}", f"training.save_every_steps={args.save_every}",
        f"training.async_checkpoint={str(asynchronous).lower()}", f"training.seq_len={args.seq_len}",
        f"training.global_batch_size={args.batch}", f"training.micro_batch_size={args.batch}",
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={max(1, args.d_model // 64)}",
        "model.n_kv_heads=null", f"model.ffn_hidden_size={args.d_model * 11 // 4}", "model.max_seq_len=256",
        "schedule.warmup_steps=1", "training.eval_every_steps=0", "training.log_every_steps=1", "training.keep_last_checkpoints=2",
        "logging.wandb_mode=disabled", "logging.progress_bar=false", "evaluation.max_tokens=256",
    ]
    config = load_config(REPOSITORY / "configs" / "experiments" / "quickstart" / "swiglu.yaml", overrides)
    original = Trainer.save_checkpoint

    def timed(trainer: Trainer) -> None:
        begin = time.perf_counter()
        original(trainer)
        stalls.append(time.perf_counter() - begin)

    class BackgroundWrites(logging.Handler):  # async_save logs each write's duration
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("checkpoint step_%d written in the background"):
                writes.append(record.args[1])

    handler = BackgroundWrites()
    async_logger = logging.getLogger("polycom_lm.checkpoint.async_save")
    async_logger.addHandler(handler)
    async_logger.setLevel(logging.INFO)
    Trainer.save_checkpoint = timed
    steps = StepTimes()
    try:
        run_training(config, overwrite=True, extra_callbacks=(steps,))
        training_s = time.perf_counter() - steps.first_start  # every step, save and the last write's end
    finally:
        Trainer.save_checkpoint = original
        async_logger.removeHandler(handler)
    # Steps whose end triggered a save are timed before their save (the stall is separate); the ones right
    # after a save ran beside the background write.
    after_save = [seconds for step, seconds in steps.step_s.items() if step > 1 and (step - 1) % args.save_every == 0]
    plain = [seconds for step, seconds in steps.step_s.items() if step > 1 and (step - 1) % args.save_every != 0]
    return {"step_after_save_s": statistics.median(after_save) if after_save else float("nan"),
            "step_s": statistics.median(plain) if plain else float("nan"), "training_s": training_s}


def main(argv=None) -> int:
    args = parse_arguments(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_checkpoint-"))
    results = {mode: {"stalls": [], "writes": [], "steps": []} for mode in ("sync", "async")}
    run_mode(args, root / "warm-up", False, [], [], steps=2)  # one-time costs (kernels, caches) off the record
    for round_index in range(args.rounds):
        for mode in ("sync", "async"):
            entry = results[mode]
            entry["steps"].append(run_mode(args, root / f"{mode}-{round_index}", mode == "async", entry["stalls"], entry["writes"]))
    checkpoint = root / "sync-0" / "checkpoints" / f"step_{args.steps}"
    size_gb = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file()) / 1e9
    print(f"checkpoint of {size_gb:.2f} GB (d_model {args.d_model}, {args.layers} layers, fp32 weights + AdamW moments), "
          f"{args.steps} steps, a save every {args.save_every}, {args.rounds} round(s)")
    print(f"{'mode':<6} {'saves':>5} {'stall median s':>15} {'stall max s':>12} {'write median s':>15} "
          f"{'step s':>8} {'step after save s':>18} {'training s':>11}")
    rows = []
    for mode, entry in results.items():
        stalls, writes = entry["stalls"], entry["writes"]
        step = statistics.median(r["step_s"] for r in entry["steps"])
        after = statistics.median(r["step_after_save_s"] for r in entry["steps"])
        write = statistics.median(writes) if writes else float("nan")
        training = statistics.median(r["training_s"] for r in entry["steps"])
        row = {"mode": mode, "saves": len(stalls), "stall_median_s": statistics.median(stalls), "stall_max_s": max(stalls),
               "write_median_s": write, "step_s": step, "step_after_save_s": after, "training_s": training}
        rows.append(row)
        print(f"{mode:<6} {len(stalls):>5} {row['stall_median_s']:>15.3f} {row['stall_max_s']:>12.3f} {write:>15.3f} "
              f"{step:>8.3f} {after:>18.3f} {training:>11.1f}")
    ratio = rows[0]["stall_median_s"] / rows[1]["stall_median_s"]
    print(f"sync / async stall per save (medians): {ratio:.1f}x; whole training, sync / async: "
          f"{rows[0]['training_s'] / rows[1]['training_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_gb": size_gb, "rows": rows, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
