"""`polycom-lm` command line. Owns the console: library code logs, commands print.

Each subcommand lives in `polycom_lm/commands/<name>.py` and exposes `add_parser(subparsers)`, which
adds its parser and sets `func(args) -> int`. The commands that take a config (`CONFIG_COMMANDS`) accept
overrides as `key=value`, `--key=value` or `--key value` anywhere after the command
(`polycom_lm.commands.overrides`); they reach the command as `args.overrides`. Errors caused by user input
(`PolycomError`) print one line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from polycom_lm.commands.overrides import split_overrides
from polycom_lm.errors import PolycomError

COMMANDS = ["info", "config", "train", "checkpoint", "tokenizer", "preprocess", "study", "compare", "analyze", "eval",
            "export", "generate"]
CONFIG_COMMANDS = ("info", "config", "train")


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


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the overrides out of the arguments of a config command (argparse cannot place `--model.x`)."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] == "--log-level" else 1  # the global options before the command
    if index >= len(argv) or argv[index] not in CONFIG_COMMANDS:
        return argv, []
    rest, overrides = split_overrides(argv[index + 1:])
    return argv[: index + 1] + rest, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments, overrides = _split_config_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(arguments)
    if hasattr(args, "overrides"):
        # Tokens argparse kept as overrides are not of a valid form: `load_config` names them.
        args.overrides = overrides + list(args.overrides)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except PolycomError as error:
        # A rank stopped by another rank's failure stays quiet: that rank printed the run's one line.
        if not getattr(error, "printed_elsewhere", False):
            print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
