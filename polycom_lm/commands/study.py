"""`polycom-lm study STUDY.yaml [--dry-run] [--launcher local|torchrun|slurm] [--jobs N]`: run a grid of experiments.

The study file names a base config, a grid of dotted keys and per-value overrides (see
`polycom_lm/study/spec.py`). Runs are named from their grid values and live under the study's output
folder; running the same command again skips finished runs and resumes an interrupted one. When every run
has finished, `compare` writes the study's report (`report_dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

LAUNCHERS = ("local", "torchrun", "slurm")  # polycom_lm.study.runner.LAUNCHERS (imported lazily: torch, matplotlib)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run a grid of training runs (activations x seeds x ...) from a study file, restartably",
        description=(
            "Expand STUDY (a base config, a grid of dotted keys, per-value overrides, optionally a learning-rate "
            "sweep per variant) into named runs under the study's output_dir, and train them: one after another "
            "(local, torchrun) or as a SLURM job array (slurm writes the script and prints the sbatch command). "
            "Finished runs are skipped and an interrupted one resumes from its checkpoint, so the same command "
            "continues a study. When all runs have finished, the comparison report is written."
        ),
        epilog=(
            "examples:\n"
            "  polycom-lm study configs/experiments/study_cpu/study.yaml --dry-run\n"
            "  polycom-lm study configs/experiments/study_cpu/study.yaml\n"
            "  polycom-lm study configs/experiments/dense_1b/study.yaml --launcher slurm"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="study YAML file")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state; write and run nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: one process per run; torchrun: N processes per run; slurm: write a job array")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                        help="processes per run for torchrun / slurm (default: the study's launcher.nproc_per_node)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="local launcher: train N runs at once, the CPU cores shared between them (default 1; "
                             "small models on a CPU train faster in all as 2 one-thread runs than one after another)")
    parser.add_argument("--only", default=None, metavar="RUN",
                        help="train only this run (main/<name> or lr_sweep/<name>; what each SLURM array task does)")
    parser.set_defaults(func=run)


def _dry_run(spec, nproc: int) -> int:
    from polycom_lm.study import runner

    sweep, main, selection = runner.plan(spec, nproc)
    print(f"study {spec.name}: {len(main)} runs" + (f" after an LR sweep of {len(sweep)} runs" if sweep else "")
          + f", in {spec.output_dir}")
    if spec.ladder is not None:
        _ladder_sizes(spec, main)
    for run in sweep + main:
        status = runner.run_status(run)
        state = status.state + (f" at step {status.step}" if status.state == runner.PARTIAL and status.step else "")
        lr = "lr chosen by the sweep" if run.lr_pending else f"lr {run.config.optimizer.lr:g}"
        print(f"  {run.phase:8s} {run.name:40s} {lr:24s} {run.config.training.max_steps:>7d} steps  {state}")
    return 0


def _ladder_sizes(spec, main) -> None:
    """One line per ladder size and budget: N, total parameters, tokens, FLOPs per token, steps and warmup."""
    from polycom_lm.models.flops import training_flops_per_token
    from polycom_lm.study.ladder import size_parameters

    seen = set()
    for run in main:
        cell = (run.grid["size"], run.grid["budget"])
        if cell in seen:
            continue
        seen.add(cell)
        counts = size_parameters(run.config, spec.ladder.baseline)
        training = run.config.training
        tokens = training.max_steps * training.global_batch_size * training.seq_len
        flops = training_flops_per_token(run.config.model, training.seq_len)
        print(f"  size {cell[0]} ({cell[1]}): {counts['non_embedding']:,} non-embedding / {counts['total']:,} total "
              f"parameters, {tokens:,} tokens, {flops / 1e6:.2f} MFLOPs/token ({flops * tokens:.2e} FLOPs), "
              f"{training.max_steps} steps of {training.global_batch_size} x {training.seq_len}, warmup "
              f"{run.config.schedule.warmup_steps}")


def run(args: argparse.Namespace) -> int:
    from polycom_lm.study import runner, slurm
    from polycom_lm.study.report import write_report
    from polycom_lm.study.spec import load_study

    spec = load_study(Path(args.study))
    nproc = args.nproc_per_node or spec.nproc_per_node
    if args.dry_run:
        return _dry_run(spec, nproc if args.launcher != "local" else 1)
    if args.launcher == "slurm":
        sweep, main, selection = runner.plan(spec, nproc)
        runner.write_study_file(spec, main, selection)
        scripts, command = slurm.write_scripts(spec, sweep, main, nproc)
        for script in scripts:
            print(f"wrote {script}")
        print(command)
        return 0
    try:
        main = runner.run_study(spec, args.launcher, args.nproc_per_node, args.only, on_event=print, jobs=args.jobs)
    except runner.RunFailed as error:
        print(f"error: {error}")
        return 1
    except runner.RunStopped as error:
        print(f"stopped: {error}")
        return error.exit_status
    if args.only is None and main and all(runner.run_status(r).state == runner.DONE for r in main):
        out = spec.report_dir or spec.output_dir / "report"
        write_report([spec.output_dir], out)
        print(f"report: {out / 'report.md'}")
    return 0
