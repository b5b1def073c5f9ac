"""The data pipeline: sources → tokenizer → token shards → packed, resumable training batches.

    sources.py       the `data source` registry: files / globs / directories, `hf:...`, `builtin:pydoc`
    files.py         streaming readers for text, jsonl, json, parquet
    pydoc_corpus.py  the embedded offline corpus (Python's own documentation)
    tokenizer.py     SentencePiece / Hugging Face tokenizers behind one interface; SentencePiece training
    shards.py        the shard folder format (flat tokens + document offsets + manifest)
    preprocess.py    multi-process, streaming, deterministic tokenisation into shards
    dataset.py       `PackedDataset` (mixture, packing, seed/epoch shuffle, sampler state = samples consumed)
                     and `ValidationDataset` (fixed order)
    prepare.py       `prepare_run_data`: a run's data config → cached shards, built once by the main process
"""

from polycom_lm.data.dataset import PackedDataset, ValidationDataset
from polycom_lm.data.prepare import PreparedData, prepare_run_data
from polycom_lm.data.preprocess import preprocess
from polycom_lm.data.shards import read_shard
from polycom_lm.data.sources import SOURCES, SourceOptions, open_source
from polycom_lm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer, train_sentencepiece

__all__ = [
    "PackedDataset",
    "PreparedData",
    "SOURCES",
    "SourceOptions",
    "Tokenizer",
    "ValidationDataset",
    "check_vocab",
    "load_tokenizer",
    "open_source",
    "prepare_run_data",
    "preprocess",
    "read_shard",
    "train_sentencepiece",
]
