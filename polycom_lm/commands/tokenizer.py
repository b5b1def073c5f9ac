"""`polycom-lm tokenizer train`: train a SentencePiece tokenizer (BPE or unigram) from any data source.

    polycom-lm tokenizer train --source builtin:pydoc --vocab-size 8192 --out tokenizers/pydoc8k
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polycom_lm.errors import DataError


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """`--source` (repeatable) and the options that say how raw files are read; shared with `preprocess`."""
    parser.add_argument("--source", action="append", required=True, metavar="SOURCE",
                        help="a file, directory or glob of .txt/.jsonl/.json/.parquet files, hf:NAME[:CONFIG][:SPLIT], "
                             "or builtin:pydoc; repeat for several")
    parser.add_argument("--text-field", default="text", help="field holding the document in jsonl/json/parquet/HF rows")
    parser.add_argument("--document-delimiter", default=None,
                        help="text files: a line separating documents (e.g. '<|endoftext|>') or 'blank_lines'; "
                             "default: one document per file")
    parser.add_argument("--decode-errors", choices=("strict", "replace"), default="strict",
                        help="bad UTF-8: stop with an error naming file and byte (strict) or substitute U+FFFD")
    parser.add_argument("--newlines", choices=("normalize", "keep"), default="normalize",
                        help="normalize: \\r\\n and lone \\r become \\n (default, as Python reads text); keep: as decoded")


def source_options(args: argparse.Namespace):
    from polycom_lm.data.sources import SourceOptions

    return SourceOptions(args.text_field, args.document_delimiter, args.decode_errors, args.newlines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train tokenizers", description="Tokenizer tools.")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    actions.required = True
    train = actions.add_parser(
        "train", help="train a SentencePiece model from a data source",
        description="Train a SentencePiece model (BPE or unigram) on the first --max-chars characters of the "
                    "sources and write DIR/tokenizer.model. Text is kept verbatim (newlines are tokens), ids: "
                    "unk 0, bos 1, eos 2, pad 3.")
    add_source_arguments(train)
    train.add_argument("--vocab-size", type=int, required=True, help="number of tokens")
    train.add_argument("--out", required=True, help="output folder (must not hold a tokenizer yet)")
    train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    train.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                       help="encode unknown characters as UTF-8 bytes instead of <unk> (default on)")
    train.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                       help="extra tokens kept whole, e.g. '<|im_start|>'")
    train.add_argument("--max-chars", type=int, default=20_000_000, help="characters of text to train on")
    train.add_argument("--threads", type=int, default=1, help="SentencePiece trainer threads")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from polycom_lm.data.sources import iter_sources
    from polycom_lm.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, train_sentencepiece

    out = Path(args.out)
    if (out / SENTENCEPIECE_FILE).exists() or (out / HF_FILE).exists():
        raise DataError(f"{out} already holds a tokenizer; choose another --out or remove it")
    documents = iter_sources(args.source, source_options(args))
    tokenizer = train_sentencepiece(documents, out, args.vocab_size, args.model_type, args.byte_fallback,
                                    args.special_tokens, args.max_chars, args.threads)
    print(f"wrote {out / SENTENCEPIECE_FILE}: {tokenizer.vocab_size} tokens ({args.model_type}), "
          f"identity {tokenizer.identity}, eos {tokenizer.eos_id}")
    return 0
