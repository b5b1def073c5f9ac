"""`polycom-lm train CONFIG [key=value | --key=value | --key value ...] [--resume [CHECKPOINT] | --overwrite]`.

Runs in one process, or one per rank under `torchrun --nproc-per-node N -m polycom_lm.cli train ...`
(or `torchrun ... $(which polycom-lm) train ...`). Rank 0 owns the console: progress bar, evaluation lines
and the closing summary of where metrics and checkpoints are.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from polycom_lm.config import load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from an experiment config (single process or under torchrun)",
        description=(
            "Train the model described by CONFIG. The run's folder (training.output_dir) receives config.yaml, "
            "metrics.jsonl and checkpoints/step_N with a `latest` pointer. When that folder already holds the "
            "same run, training resumes from its latest checkpoint."
        ),
        epilog=(
            "examples:\n"
            "  polycom-lm train configs/experiments/quickstart/polynorm.yaml\n"
            "  polycom-lm train configs/experiments/quickstart/relu.yaml training.max_steps=50 optimizer.lr=1e-3\n"
            "  polycom-lm train configs/experiments/quickstart/relu.yaml --training.max_steps=50 --optimizer.lr 1e-3\n"
            "  torchrun --nproc-per-node 2 -m polycom_lm.cli train configs/experiments/quickstart/swiglu.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML file (may inherit with `base:`)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted config overrides, e.g. training.max_steps=100 model.activation=polyrelu (also spelled "
             "--training.max_steps=100 or --training.max_steps 100, anywhere after the command)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="resume from the output folder's latest checkpoint even if the config changed, or from the "
             "checkpoint folder CHECKPOINT (e.g. runs/x/checkpoints/step_500)",
    )
    group.add_argument(
        "--overwrite", action="store_true",
        help="remove the run already in training.output_dir (its config, metrics, checkpoints) and start over",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="load a DeepSpeed checkpoint even if it holds objects beyond tensors and DeepSpeed's own classes "
             "(unpickling them can run code: only for checkpoints you made yourself)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.train import run_training
    from polycom_lm.train.callbacks import ConsoleLogCallback, ProgressCallback

    config = load_config(args.config, args.overrides)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Other ranks log warnings and errors only; rank 0 speaks for the run.
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    show_progress = rank == 0 and config.logging.progress_bar and not args.no_progress and sys.stderr.isatty()
    if rank != 0:
        extra = ()
    else:
        extra = (ProgressCallback(),) if show_progress else (ConsoleLogCallback(),)
    result = run_training(
        config, resume=args.resume, overwrite=args.overwrite, extra_callbacks=extra,
        trust_checkpoint=args.trust_checkpoint,
    )
    if result.stopped is not None:
        _ignore_stop_signals(config.training.stop_signals)
    if rank == 0 and result.stopped is not None:
        print(f"stopped after step {result.final_step} ({result.stopped.describe()}): checkpoint "
              f"{result.checkpoints_dir / f'step_{result.final_step}'} is complete; run the same command to continue")
    if result.stopped is not None:
        return result.stopped.exit_status
    if rank == 0:
        last = result.last_train_row or {}
        print(f"finished step {result.final_step}", end="")
        if last:
            print(f": loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.1%}", end="")
        print()
        for row in result.final_evaluation:
            print(f"validation set {row['name']!r}: loss {row['loss']:.4f}, perplexity {row['perplexity']:.2f}")
        print(f"metrics:     {result.metrics_path}")
        print(f"checkpoints: {result.checkpoints_dir} (latest: {result.checkpoints_dir / 'latest'})")
        print(f"config:      {result.output_dir / 'config.yaml'}")
    return 0



def _ignore_stop_signals(names: list[str]) -> None:
    """After a stop's checkpoint is complete, a further stop signal has nothing left to stop: ignore it, so
    that one landing while the process exits (as a second SIGTERM of a scheduler does) leaves the exit
    status at 128 + the first signal instead of killing the process."""
    import signal

    from polycom_lm.train.stop import signal_numbers

    for number in signal_numbers(names):
        signal.signal(number, signal.SIG_IGN)
