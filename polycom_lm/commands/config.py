"""`polycom-lm config CONFIG [overrides]`: print the fully resolved config as YAML, after the checks that
`train` runs before it starts (types, values, batch layout for `--world-size` ranks, registered names).

The output is what `train` would run: every key with its value, defaults included (a `null` wandb key
means "not set here": wandb's environment decides, see the README). It loads back unchanged, so it can be
saved and trained as it is. Nothing is built, downloaded or written.
"""

from __future__ import annotations

import argparse
import os
import sys

from polycom_lm.config import load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the fully resolved config (base files and overrides applied, validated) as YAML",
        description="Print the fully resolved config as YAML, after the checks `train` runs before it starts: "
                    "what `train` would run. Nothing is built, downloaded or written.",
    )
    parser.add_argument("config", help="experiment YAML file (may inherit with `base:`)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides: key=value, --key=value or --key value")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="check the batch layout for this many processes (default: $WORLD_SIZE or 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.errors import ConfigError
    from polycom_lm.train.validation import validate_config

    if args.world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {args.world_size}")
    config = load_config(args.config, args.overrides)
    layout = validate_config(config, args.world_size)
    sys.stdout.write(layout_comment(config, layout, args.world_size))
    sys.stdout.write(config.to_yaml())
    return 0


def layout_comment(config, layout, world_size: int) -> str:
    """How `world_size` ranks split the work, as YAML comment lines (the output still loads unchanged)."""
    distributed = config.distributed
    lines = [
        f"# layout on {world_size} rank(s): pp {distributed.pp} x dp {layout.dp_world_size} x tp {distributed.tp}"
        + (f" (ep {distributed.ep} within dp)" if distributed.ep > 1 else "")
        + f", backend {distributed.backend}",
        f"# per step: {layout.global_batch_size} sequences of {layout.seq_len} tokens; per data-parallel rank "
        f"{layout.accumulation_steps} micro-batch(es) of {layout.micro_batch_size}",
    ]
    if distributed.pp > 1:
        from polycom_lm.distributed.pipeline import pipeline_summary

        summary = pipeline_summary(config, layout.accumulation_steps)
        lines.append(
            f"# pipeline: {summary['schedule']}, {summary['stages']} stages ({summary['stages_per_rank']} per rank), "
            f"blocks per stage {summary['layers_per_stage']}, bubble {summary['bubble_fraction']:.1%} of the step"
        )
    return "\n".join(lines) + "\n"
