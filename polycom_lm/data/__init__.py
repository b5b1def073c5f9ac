"""The data pipeline: sources → tokenizer → token shards → packed, resumable training batches.

    sources.py       the `data source` registry: files / globs / directories, `hf:...`, `builtin:pydoc`
    files.py         streaming readers for text, jsonl, json, parquet
    pydoc_corpus.py  the embedded offline corpus (Python's own documentation)
    tokenizer.py     SentencePiece / Hugging Face tokenizers behind one interface; SentencePiece training
    shards.py        the shard folder format (flat tokens + document offsets + manifest)
    preprocess.py    multi-process, streaming, deterministic tokenisation into shards
    mixture.py       which source each sample of a weighted mixture comes from (stateless blocks)
    dataset.py       `PackedDataset` (mixture, packing, seed/epoch shuffle, sampler state = samples consumed)
                     and `ValidationDataset` (fixed order)
    packing.py       documents → windows of seq_len + 1 tokens with a resumable position (for streams)
    stream_worker.py the process that reads, tokenises (in a pool) and packs streamed sources
    stream.py        `StreamingDataset` (on-the-fly batches, position saved in checkpoints) and
                     `build_train_dataset` (streaming or packed, from the prepared sources)
    hub.py           tokenizers by Hugging Face hub id, through the local Hugging Face cache
    prepare.py       `prepare_run_data`: a run's data config → cached shards (built once by the main
                     process) and sources to stream
"""

import importlib

# Imported lazily (PEP 562) so that tokeniser worker processes, which import
# `polycom_lm.data.preprocess`, do not pay for torch.
_EXPORTS = {
    "PackedDataset": "dataset",
    "StreamingDataset": "stream",
    "build_train_dataset": "stream",
    "ValidationDataset": "dataset",
    "PreparedData": "prepare",
    "prepare_run_data": "prepare",
    "read_shard": "shards",
    "SOURCES": "sources",
    "SourceOptions": "sources",
    "open_source": "sources",
    "Tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polycom_lm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"polycom_lm.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
