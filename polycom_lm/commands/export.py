"""`polycom-lm export MODEL --out DIR [--dtype fp32|bf16]`: a transformers folder of a trained model.

Dense SwiGLU models become `LlamaForCausalLM`, MoE SwiGLU ones `OlmoeForCausalLM`, every other activation
`PolycomForCausalLM`, shipped as remote code in the folder (`AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`). The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from polycom_lm.commands.model_source import add_model_arguments, load_from_arguments
from polycom_lm.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1048576' → bytes (powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or a number of bytes")
    unit = match.group(2).upper().rstrip("B")
    size = int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit])
    if size < 1:
        raise ConfigError(f"--max-shard-size must be positive, got {text!r}")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a transformers folder (config, safetensors, tokenizer)",
                                   description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, device=False)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.pretrained.export import DTYPES, check_output_folder, export_model

    max_shard_bytes = parse_size(args.max_shard_size)
    check_output_folder(args.out, args.force)  # before the (slow) load
    loaded = load_from_arguments(args, device="cpu")
    result = export_model(loaded, args.out, dtype=DTYPES[args.dtype], force=args.force, max_shard_bytes=max_shard_bytes)
    step = f"step {loaded.step}" if loaded.step is not None else "unknown step"
    print(f"model:        {loaded.source} ({loaded.kind}, {step})")
    print(f"architecture: {result.architecture} ({loaded.model_config.family}, {loaded.model_config.activation})")
    print(f"wrote:        {result.out} ({result.parameters:,} parameters, {args.dtype}, "
          f"{result.shards} safetensors file(s))")
    if result.architecture == "PolycomForCausalLM":
        print("load with:    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    return 0
