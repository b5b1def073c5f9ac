"""`polycom-lm checkpoint consolidate RUN_DIR [--step N] --out FILE`: one safetensors model file from a
checkpoint of any engine (DCP from ddp / fsdp / tensor parallel, or DeepSpeed ZeRO 1/2/3).

The file holds the model's parameters by name in the canonical (unsharded, TP-independent) layout, so
`build_model(config.model)` + `load_state_dict(safetensors.torch.load_file(FILE))` restores the model in one
process. When the run folder has its `config.yaml`, the state is checked against a freshly built model
before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polycom_lm.errors import CheckpointError

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect and convert checkpoints")
    actions = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    actions.required = True
    consolidate = actions.add_parser(
        "consolidate",
        help="write one safetensors model file from a (sharded / DeepSpeed) checkpoint",
        description=__doc__.split("\n\n")[0],
    )
    consolidate.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's output folder")
    consolidate.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    consolidate.add_argument("--out", type=Path, required=True, metavar="FILE", help="safetensors file to write")
    consolidate.add_argument("--force", action="store_true", help="replace FILE if it exists")
    consolidate.add_argument(
        "--trust-checkpoint", action="store_true",
        help="read a DeepSpeed checkpoint even if it holds objects beyond tensors and DeepSpeed's own classes "
             "(unpickling them can run code: only for checkpoints you made yourself)",
    )
    consolidate.set_defaults(func=run_consolidate)


def check_against_config(run_dir: Path, state: dict) -> str | None:
    """Check `state` against a model built from RUN_DIR/config.yaml (strictly: names and shapes); returns
    the config path used, or None when the run folder has none."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    from polycom_lm.config import load_config
    from polycom_lm.models import build_model
    from polycom_lm.pretrained.loading import check_state_matches

    config = load_config(config_path)
    check_state_matches(state, build_model(config.model, device="meta"),
                        f"checkpoint does not match the model of {config_path}")
    return str(config_path)


def run_consolidate(args: argparse.Namespace) -> int:
    from polycom_lm.checkpoint.consolidate import checkpoint_format, consolidated_model_state, write_safetensors
    from polycom_lm.checkpoint.folders import find_checkpoint

    if args.out.exists() and not args.force:
        raise CheckpointError(f"{args.out} exists; pass --force to replace it")
    directory = find_checkpoint(args.run_dir, args.step)
    kind = checkpoint_format(directory)
    state = consolidated_model_state(directory, trust_checkpoint=args.trust_checkpoint)
    config_path = check_against_config(args.run_dir, state)
    metadata = {"format": "pt", "source": str(directory), "checkpoint_format": kind}
    write_safetensors(state, args.out, metadata)
    parameters = sum(tensor.numel() for tensor in state.values())
    print(f"checkpoint:  {directory} ({kind})")
    if config_path:
        print(f"checked:     against the model of {config_path}")
    print(f"wrote:       {args.out} ({len(state)} tensors, {parameters:,} parameters)")
    return 0
