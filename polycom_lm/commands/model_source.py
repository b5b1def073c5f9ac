"""The MODEL argument shared by `eval`, `export` and `generate`: a run folder, a checkpoint folder or an
exported folder, with `--step`, `--tokenizer`, `--device` and `--trust-checkpoint`. Not a command itself."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from polycom_lm.errors import ConfigError

MODEL_HELP = ("a run folder (its latest checkpoint, or --step), a checkpoint folder (RUN/checkpoints/step_N) "
              "or an exported folder (polycom-lm export)")


def add_model_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default: the latest)")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                        help="tokenizer folder (default: the run's, or the exported folder's own)")
    if device:
        parser.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read a DeepSpeed checkpoint even if it holds objects beyond tensors (only for your own)")


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but CUDA is not available; use --device cpu")
    return device


def load_from_arguments(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32):
    from polycom_lm.pretrained.loading import load_model

    return load_model(args.model, step=args.step, tokenizer=args.tokenizer, device=device, dtype=dtype,
                      trust_checkpoint=args.trust_checkpoint)
