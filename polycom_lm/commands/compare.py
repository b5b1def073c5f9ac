"""`polycom-lm compare RUN_OR_STUDY... [--out DIR]`: report.md, report.json and figures for runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare runs or studies: report.md with a per-activation table (mean ± std over seeds) and figures",
        description=(
            "Read run folders (config.yaml + metrics.jsonl) and study folders (study.json) and write report.md, "
            "report.json and PNG figures: training loss, validation loss / perplexity and downstream accuracy "
            "against tokens, throughput, a table per variant (mean ± std over seeds, difference to SwiGLU with "
            "its standard error), the learned PolyCom coefficients of every layer, and the analyses of "
            "`polycom-lm analyze` where the runs have them. On a ladder study (a `ladder:` section): the tables "
            "per size, the fit L(C) = E + A·C^(−α) per activation (and L(N, D) with several budgets), compute "
            "multipliers against SwiGLU with bootstrap intervals over seeds, the held-out largest size and "
            "loss-vs-compute / multiplier / residual figures."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_STUDY", help="run folders and / or study folders")
    parser.add_argument("--out", default=None, help="report folder (default: ./report, or <study>/report for one study)")
    parser.add_argument("--force", action="store_true", help="replace a report.md in --out that compare did not write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.study.report import write_report

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] / "report" if len(paths) == 1 and (paths[0] / "study.json").is_file()
                                           else Path("report"))
    summary = write_report(paths, out, force=args.force)
    print(f"report: {out / 'report.md'} ({len(summary['runs'])} runs, {len(summary['variants'])} variants)")
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0
