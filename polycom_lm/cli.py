"""`polycom-lm` command line. Owns the console: library code logs, commands print.

Each subcommand lives in `polycom_lm/commands/<name>.py` and exposes `add_parser(subparsers)`, which
adds its parser and sets `func(args) -> int`. Errors caused by user input (`PolycomError`) print one line
`error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from polycom_lm.errors import PolycomError

COMMANDS = ["info", "train", "checkpoint", "tokenizer", "preprocess", "study", "compare", "analyze"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polycom-lm",
        description="Pretrain decoder LLMs with PolyNorm / PolyReLU / SwiGLU / GELU / ReLU activations.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"polycom_lm.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except PolycomError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
