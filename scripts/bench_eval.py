"""Zero-shot evaluation speed: `polycom-lm eval` (shared-prefix KV cache, and without it) against
lm-evaluation-harness (`hf` model, trust_remote_code) on the same exported model and the same examples.

    python scripts/bench_eval.py runs/quickstart/polynorm --data-dir ../shared/data/eval --limit 100

The model is exported to a temporary folder (unless MODEL already is one) and both sides read that folder.
The methods run in turn, `--repeats` times, each keeping its run with the least CPU time: on a machine
shared with other programs, this process's CPU time (`time.process_time`, all its threads) is what they
disturb least, so the ratios are CPU-time ratios; wall-clock rates are printed beside them. lm-eval's model
is built once, outside the timed part, and its bootstrap standard errors are off. Printed: examples per
second of each method, the ratios to lm-eval, every task's accuracies on both sides, and the largest
difference of a request's log-likelihood between lm-eval and ours.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ALL_TASKS = "hellaswag,arc_easy,arc_challenge,piqa,boolq,winogrande,openbookqa,lambada,copa"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=REPO / "runs" / "quickstart" / "polynorm")
    parser.add_argument("--tasks", default=ALL_TASKS)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "eval")
    parser.add_argument("--limit", type=int, default=100, help="first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=32, help="requests per forward, both sides")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is compute time)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    import torch

    from polycom_lm.eval import get_task, parse_task_list
    from polycom_lm.eval.harness import harness_model, run_harness
    from polycom_lm.eval.runner import evaluate
    from polycom_lm.pretrained.export import export_model
    from polycom_lm.pretrained.loading import load_model, model_kind

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    model_dir = args.model
    if model_kind(args.model) != "export":
        model_dir = scratch / "export"
        export_model(load_model(args.model), model_dir)
    loaded = load_model(model_dir)
    tasks = [get_task(name) for name in parse_task_list(args.tasks)]
    rows = {task: task.rows(args.data_dir)[: args.limit] for task in tasks}
    examples = {task: [task.build(row) for row in task_rows] for task, task_rows in rows.items()}
    count = sum(len(value) for value in examples.values())
    requests = sum(len(example.requests) for value in examples.values() for example in value)
    lm = harness_model(model_dir, batch_size=args.batch_size)

    best: dict[str, tuple[float, float]] = {}  # name -> (CPU seconds, wall seconds) of the run with least CPU
    outputs: dict[str, object] = {}

    def timed(name, function):
        cpu, wall = time.process_time(), time.perf_counter()
        outputs[name] = function()
        measured = (time.process_time() - cpu, time.perf_counter() - wall)
        best[name] = min(best.get(name, (float("inf"), 0.0)), measured)

    for repeat in range(args.repeats):
        timed("lm-eval", lambda: run_harness(lm, rows, scratch / f"harness_{repeat}"))
        for share in (True, False):
            timed(f"polycom-lm eval ({'shared prefix' if share else 'no sharing'})", lambda share=share: evaluate(
                loaded.model, loaded.tokenizer, examples, max_length=loaded.model_config.max_seq_len,
                batch_size=args.batch_size, share_context=share, keep_samples=True))

    print(f"model {args.model} ({loaded.model_config.activation}, {loaded.model_config.family}), {count} examples "
          f"({requests} requests) of {len(tasks)} tasks, batch size {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__}, best of {args.repeats}")
    # CPU time of this process is the measure that other programs on a shared machine disturb least.
    baseline = count / best["lm-eval"][0]
    for name, (cpu, wall) in best.items():
        rate = count / cpu
        print(f"  {name:<36} {cpu:8.1f} CPU s ({wall:6.1f} s wall)  {rate:8.2f} examples per CPU s  "
              f"{count / wall:6.2f} examples/s wall  {rate / baseline:5.2f}x lm-eval")
    harness = outputs["lm-eval"]
    identical = True
    worst = 0.0
    print(f"  {'task':<16}{'metric':<12}{'lm-eval':>14}{'ours':>14}")
    for result in outputs["polycom-lm eval (shared prefix)"].results:
        theirs = harness[result.task]
        for metric, value in result.metrics.items():
            other = theirs["metrics"][metric]
            same = value == other if metric != "perplexity" else abs(value - other) <= 1e-4 * abs(other)
            identical &= same
            print(f"  {result.task:<16}{metric:<12}{other:>14.6g}{value:>14.6g}{'' if same else '  DIFFERENT'}")
        for sample, lls in zip(result.samples, theirs["loglikelihoods"]):
            worst = max(worst, max(abs(a - b) for a, b in zip(sample["loglikelihoods"], lls)))
    print(f"accuracies identical: {identical}; largest |log-likelihood difference| of a request: {worst:.2e}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
