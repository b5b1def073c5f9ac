"""`polycom-lm preprocess`: tokenise sources into memory-mapped token shards.

    polycom-lm preprocess --source 'data/*.jsonl' --tokenizer tokenizers/pydoc8k --out shards/mydata \
        --workers 4 --val-fraction 0.01

writes `OUT/train/` (and `OUT/validation/`), each a shard folder that `data.train[].source` or
`data.validation[].source` can name (OUT itself works too for training: its `train/` is used and its
`validation/` becomes the validation set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polycom_lm.commands.tokenizer import add_source_arguments, source_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess", help="tokenise sources into token shards",
        description="Tokenise sources with several worker processes into OUT/train (and OUT/validation): a flat "
                    "token file, document offsets and a JSON manifest. Streaming, deterministic whatever --workers, "
                    "written under a temporary name and renamed when complete.")
    add_source_arguments(parser)
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer folder (tokenizer.model or tokenizer.json) or Hugging Face hub id "
                             "(e.g. EleutherAI/gpt-neox-20b, resolved through the local Hugging Face cache)")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--workers", type=int, default=1, help="tokeniser processes")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--val-fraction", type=float, default=0.0,
                          help="hold out this fraction of documents (chosen by a hash of their text) into OUT/validation")
    held_out.add_argument("--val-source", action="append", default=[], metavar="SOURCE",
                          help="tokenise this source into OUT/validation (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from polycom_lm.data.hub import resolve_tokenizer_path
    from polycom_lm.data.preprocess import preprocess
    from polycom_lm.data.shards import read_manifest

    # The bar appears with the first tokens, so input errors found up front print only their one line.
    state = {"bar": None, "documents": 0}

    def progress(tokens: int, documents: int) -> None:
        if state["bar"] is None:
            state["bar"] = tqdm(unit="tok", unit_scale=True, desc="tokenising", dynamic_ncols=True)
        state["documents"] += documents
        state["bar"].set_postfix(documents=state["documents"], refresh=False)
        state["bar"].update(tokens)

    try:
        outputs = preprocess(args.source, resolve_tokenizer_path(args.tokenizer), Path(args.out), workers=args.workers,
                             val_fraction=args.val_fraction, val_sources=args.val_source,
                             options=source_options(args), progress=None if args.no_progress else progress)
    finally:
        if state["bar"] is not None:
            state["bar"].close()
    for name, path in outputs.items():
        manifest = read_manifest(path)
        print(f"{name}: {path}  {manifest['num_documents']} documents, {manifest['num_tokens']} tokens, {manifest['dtype']}")
    return 0
