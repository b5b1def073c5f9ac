"""`polycom-lm analyze MODEL [--data SOURCE] [--out DIR]`: effective rank of the FFN weights and
layer-wise cosine similarity of hidden states, as JSON and figures."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's analyses of a trained model: effective rank of FFN weights, hidden-state cosine similarity",
        description=(
            "MODEL is a run folder (its latest checkpoint is analysed) or a checkpoint folder "
            "(<run>/checkpoints/step_N). Writes analysis.json, effective_rank.png and cosine_similarity.png into "
            "--out (default: <run>/analysis), where `polycom-lm compare` finds them."
        ),
    )
    parser.add_argument("model", help="run folder or checkpoint folder")
    parser.add_argument("--data", default=None, metavar="SOURCE",
                        help="text for the hidden states: a shard folder or any data source (tokenised with the run's "
                             "tokenizer); default: the run's first validation set")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/analysis)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of validation text to average over")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polycom_lm.study import plots
    from polycom_lm.study.analysis import analyze_model, resolve_model_folder

    run_dir, _ = resolve_model_folder(Path(args.model))
    out = Path(args.out) if args.out else run_dir / "analysis"
    result = analyze_model(Path(args.model), args.data, args.tokens, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / f".analysis.json.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    label = f"{result['activation']} (step {result['step']})"
    plots.analysis_figures({label: [result]}, plots.colours([label]), out)
    os.replace(temporary, out / "analysis.json")
    ranks = result["effective_rank"]
    print(f"step {result['step']} ({result['activation']}): effective rank in-proj "
          f"{sum(ranks['in_proj']) / len(ranks['in_proj']):.1f}, out-proj {sum(ranks['out_proj']) / len(ranks['out_proj']):.1f} "
          f"(layer means); cosine similarity {', '.join(f'{v:.3f}' for v in result['cosine_similarity']['values'])}")
    print(f"wrote {out / 'analysis.json'}")
    return 0
