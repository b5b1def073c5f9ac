"""`polycom-lm preprocess`: tokenise sources into memory-mapped token shards.

    polycom-lm preprocess --source 'data/*.jsonl' --tokenizer tokenizers/pydoc8k --out shards/mydata \
        --workers 4 --val-fraction 0.01 [--max-tokens 2_000_000_000]

writes `OUT/train/` (and `OUT/validation/`), each a shard folder that `data.train[].source` or
`data.validation[].source` can name (OUT itself works too for training: its `train/` is used and its
`validation/` becomes the validation set).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

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
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="token budget per source: its first N tokens (the last document cut), then stop reading")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


class ProgressBar:
    """tokens, tokens/s and an ETA: against the token budgets when every source has one, else against the
    bytes of local files (tokens so far × file bytes / text bytes read so far); no ETA for streamed hub
    data of unknown size. The bar appears with the first tokens, so errors found up front print alone."""

    def __init__(self, budget: Optional[int], total_bytes: Optional[int]):
        self.budget, self.total_bytes = budget, total_bytes
        self.bar = None
        self.documents = self.bytes = 0

    def __call__(self, tokens: int, documents: int, text_bytes: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(unit="tok", unit_scale=True, desc="tokenising", dynamic_ncols=True, total=self.budget)
        self.documents += documents
        self.bytes += text_bytes
        if self.budget is None and self.total_bytes and self.bytes:
            estimate = (self.bar.n + tokens) * self.total_bytes / self.bytes
            self.bar.total = max(int(estimate), self.bar.n + tokens)
        self.bar.set_postfix(documents=self.documents, refresh=False)
        self.bar.update(tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from polycom_lm.data.hub import resolve_tokenizer_path
    from polycom_lm.data.preprocess import preprocess
    from polycom_lm.data.shards import read_manifest
    from polycom_lm.data.sources import open_source

    options = source_options(args)
    specs = [*args.source, *args.val_source]
    sizes = [open_source(spec, options).size_bytes() for spec in specs]
    bar = ProgressBar(args.max_tokens * len(specs) if args.max_tokens else None,
                      None if None in sizes else sum(sizes))
    try:
        outputs = preprocess(args.source, resolve_tokenizer_path(args.tokenizer), Path(args.out), workers=args.workers,
                             val_fraction=args.val_fraction, val_sources=args.val_source, options=options,
                             progress=None if args.no_progress else bar, max_tokens=args.max_tokens)
    finally:
        bar.close()
    for name, path in outputs.items():
        manifest = read_manifest(path)
        print(f"{name}: {path}  {manifest['num_documents']} documents, {manifest['num_tokens']} tokens, {manifest['dtype']}")
    return 0
