"""`polycom-lm info CONFIG [key=value | --key=value | --key value ...]`: model size and cost of a config, as JSON on stdout.

The model is built on the `meta` device, so this is instant and needs no memory even for 7B presets.
"""

from __future__ import annotations

import argparse
import json

from polycom_lm.config import load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="print parameter counts and training FLOPs per token of a config (JSON)",
        description=(
            "Print, as JSON, the total, non-embedding and active parameters, the training FLOPs per token "
            "at training.seq_len (in all and by part: attention projections, attention scores, FFN, LM head), the "
            "FFN (or expert) width and the activation of the model a config describes."
        ),
    )
    parser.add_argument("config", help="experiment or model YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. model.activation=polynorm (or --model.activation=polynorm, "
                             "--model.activation polynorm)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with distributed.pp > 1: the ranks the pipeline's micro-batches are counted for "
                             "(default: $WORLD_SIZE, else pp x tp)")
    parser.set_defaults(func=run)


def model_info(config) -> dict:
    """The JSON-ready summary `info` prints for a loaded `Config`."""
    from polycom_lm.models import ffn_width
    from polycom_lm.models.flops import parameter_counts, training_flops_breakdown

    model = config.model
    counts = parameter_counts(model)
    info = {
        "experiment": config.experiment,
        "family": model.family,
        "activation": model.activation,
        "activation_order": model.activation_order,
        "total_parameters": counts["total"],
        "non_embedding_parameters": counts["non_embedding"],
        "active_parameters": counts["active"],
        "seq_len": config.training.seq_len,
    }
    breakdown = training_flops_breakdown(model, config.training.seq_len)
    info["training_flops_per_token"] = sum(breakdown.values())
    # By part: attention projections, causal attention scores, FFN (all its matrices), LM head; what a
    # scaling ladder counts as compute (element-wise work, norms and the activations themselves, is not).
    info["training_flops_per_token_by_part"] = breakdown
    if model.family == "moe":
        from polycom_lm.models.moe import expert_width

        info["expert_width"] = expert_width(model)
    else:
        info["ffn_width"] = ffn_width(model)
    return info


def pipeline_info(config, world_size: int | None) -> dict:
    """Stages, blocks per stage, micro-batches and the schedule's bubble fraction (distributed.pp > 1)."""
    import os

    from polycom_lm.distributed.pipeline import pipeline_summary
    from polycom_lm.train.validation import validate_config

    distributed = config.distributed
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "0")) or distributed.pp * distributed.tp
    layout = validate_config(config, world_size)
    return {"world_size": world_size, "data_parallel": layout.dp_world_size,
            **pipeline_summary(config, layout.accumulation_steps)}


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    info = model_info(config)
    if config.distributed.pp > 1:
        info["pipeline"] = pipeline_info(config, args.world_size)
    print(json.dumps(info, indent=2))
    return 0
