"""What a ladder study will cost on this machine, from timed training steps of each size.

For every (size, activation) of the study, the trainer's own step (`build_trainer(config).train_step()`:
the run's resolved config, a fixed batch in place of its data) is timed `--steps` times after `--warmup`
steps, all sizes and activations interleaved one step at a time so that load from other jobs hits them
alike; a variant's speed is its best step (a shared machine only ever slows a step down, as in
scripts/bench_train.py). The zero-shot tasks the study scores after each run are timed likewise on each
size's model (best of 2). Validation passes are counted at a third of a step per batch of tokens (a
forward without backward). The rest of a run (start-up, checkpoints) is the wall time of one run of the
smallest size trained in full as the study runs it (without its zero-shot tasks), less its steps and
validation at the speed measured. So, on an idle machine:

    Σ_runs  (steps + passes · eval_tokens / tokens_per_step / 3) · best_step(size, activation)
            + zero-shot tasks(size) + the fixed part of a run

    PYTHONPATH=. python scripts/bench_ladder.py configs/experiments/ladder_cpu/study.yaml [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polycom_lm.data import prepare_run_data  # noqa: E402
from polycom_lm.eval.runner import evaluate  # noqa: E402
from polycom_lm.study.grid import main_runs  # noqa: E402
from polycom_lm.study.spec import SEED_KEY, load_study  # noqa: E402
from polycom_lm.train.callbacks import DownstreamEvaluationCallback  # noqa: E402
from polycom_lm.train.run import build_trainer  # noqa: E402


class FixedBatch:
    """A dataset whose every global batch is the same tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def global_batch(self, consumed_samples: int, global_batch_size: int, rank: int, world_size: int) -> dict:
        return {"input_ids": self.tokens[:global_batch_size]}


def trainer_for(run):
    config = run.config
    tokens = torch.randint(0, config.model.vocab_size, (config.training.global_batch_size, config.training.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    return build_trainer(config, FixedBatch(tokens), device=torch.device("cpu"))


def full_run_seconds(run, folder: Path, tasks: bool) -> float:
    raw = run.config.to_dict()
    raw["training"]["output_dir"] = str(folder / f"full_{tasks}")
    if not tasks:
        raw["evaluation"]["downstream"]["tasks"] = []
    path = folder / f"full_{tasks}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "polycom_lm.cli", "train", str(path), "--no-progress", "--overwrite"],
                   check=True, capture_output=True, cwd=ROOT, env=dict(os.environ))
    return time.perf_counter() - start


def zero_shot_seconds(trainers: dict, run, rounds: int = 2) -> dict[str, float]:
    """Best of `rounds` wall seconds of the run's zero-shot tasks (as the trainer scores them after its last
    step) on each size's model, sizes interleaved; {} when the study scores none."""
    callback = DownstreamEvaluationCallback.build(run.config)
    if callback is None:
        return {}
    callback.bind(prepare_run_data(run.config.data, is_main_process=True, barrier=lambda: None).tokenizer_dir)
    best = {size: float("inf") for size in trainers}
    for _ in range(rounds):
        for size, trainer in trainers.items():
            model = trainer.engine.unwrapped_model()
            start = time.perf_counter()
            evaluate(model, callback.tokenizer, callback.tasks, max_length=run.config.model.max_seq_len,
                     batch_size=callback.settings.batch_size)
            best[size] = min(best[size], time.perf_counter() - start)
    return best


def evaluation_steps(run) -> float:
    """A run's validation passes in training-step equivalents (a forward is about a third of a step)."""
    training = run.config.training
    passes = (training.max_steps // training.eval_every_steps if training.eval_every_steps else 0) + 1
    tokens = (run.config.evaluation.max_tokens or 32768) * len(run.config.data.validation)  # 32768: a guess when unset
    return passes * tokens / (training.global_batch_size * training.seq_len) / 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    spec = load_study(Path(args.study))
    runs = main_runs(spec)
    first_seed = spec.grid.get(SEED_KEY, [None])[0]
    timed = {(run.grid["size"], run.config.model.activation): run for run in runs
             if run.grid.get(SEED_KEY) == first_seed and run.grid.get("budget") == spec.ladder.budgets[0].label}
    trainers = {key: trainer_for(run) for key, run in timed.items()}
    best = {key: float("inf") for key in trainers}
    for _ in range(args.warmup):
        for trainer in trainers.values():
            trainer.train_step()
    for _ in range(args.steps):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            best[key] = min(best[key], time.perf_counter() - start)
    for (size, activation), seconds in best.items():
        training = timed[(size, activation)].config.training
        print(json.dumps({"size": size, "activation": activation, "best_step_ms": round(1e3 * seconds, 1),
                          "tokens_per_s": round(training.global_batch_size * training.seq_len / seconds)}), flush=True)
    tasks = zero_shot_seconds({size: trainer for (size, activation), trainer in trainers.items()
                               if activation == spec.ladder.baseline}, timed[next(iter(timed))])
    for size, seconds in tasks.items():
        print(json.dumps({"size": size, "zero_shot_tasks_s": round(seconds, 1)}), flush=True)
    del trainers
    small = runs[0]
    small_key = (small.grid["size"], small.config.model.activation)
    with tempfile.TemporaryDirectory() as folder:
        without_tasks = full_run_seconds(small, Path(folder), tasks=False)
    fixed = without_tasks - (small.config.training.max_steps + evaluation_steps(small)) * best[small_key]
    total, per_size = 0.0, {}
    for run in runs:
        step = best[(run.grid["size"], run.config.model.activation)]
        seconds = (run.config.training.max_steps + evaluation_steps(run)) * step + fixed + tasks.get(run.grid["size"], 0.0)
        per_size[run.grid["size"]] = per_size.get(run.grid["size"], 0.0) + seconds
        total += seconds
    print(json.dumps({"small_run_without_tasks_s": round(without_tasks, 1), "fixed_s_per_run": round(fixed, 1),
                      "runs": len(runs), "load_average": os.getloadavg()[0],
                      "per_size_minutes": {k: round(v / 60, 1) for k, v in per_size.items()},
                      "total_hours": round(total / 3600, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
