"""Tokenise sources into token shards with several worker processes.

    out/train/        a shard folder (see `shards`), every document followed by EOS
    out/validation/   when documents are held out (`val_fraction`) or validation sources are given

The main process reads documents (streamed) and cuts them into chunks of about `chunk_chars`
characters; workers encode chunks; the main process writes results in submission order, with at most
`2 * workers` chunks in flight, so memory stays flat and the output is byte-identical whatever `workers`.
Which documents are held out is decided by a hash of each document's text, so it is stable too.
Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import itertools
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from polycom_lm.data import shards
from polycom_lm.data.packing import truncate_chunk
from polycom_lm.data.sources import SourceOptions, open_source
from polycom_lm.data.tokenizer import Tokenizer, copy_tokenizer, load_tokenizer
from polycom_lm.errors import DataError

logger = logging.getLogger(__name__)

# (tokens, documents, UTF-8 bytes of text) tokenised since the last call
ProgressCallback = Callable[[int, int, int], None]

_worker_tokenizer: Optional[Tokenizer] = None


def held_out(text: str, fraction: float) -> bool:
    """Whether a document goes to validation: a hash of its text, read as a number in [0, 1), is below
    `fraction` (duplicates therefore never straddle the split)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def encode_chunk(tokenizer: Tokenizer, texts: Sequence[str], dtype: np.dtype,
                 val_fraction: float) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Encode documents with EOS appended. Returns tokens [sum(lengths)], lengths [documents] int64 and,
    when `val_fraction` > 0, a held-out mask [documents] bool."""
    encoded = tokenizer.encode_batch(texts, add_eos=True)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
    mask = None
    if val_fraction > 0.0:
        mask = np.fromiter((held_out(text, val_fraction) for text in texts), dtype=bool, count=len(texts))
    return tokens, lengths, mask


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the process that started it dies, even by SIGKILL (which gives the
    parent no chance to stop its pool): the kernel's parent-death signal on Linux, and a watchdog thread
    that notices the re-parenting everywhere else."""
    import ctypes
    import os
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(tokenizer_dir: str, parent_pid: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent_pid)
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_in_worker(texts: list[str], dtype: str, val_fraction: float):
    assert _worker_tokenizer is not None
    return encode_chunk(_worker_tokenizer, texts, np.dtype(dtype), val_fraction)


def chunk_documents(documents: Iterable[str], chunk_chars: int, max_documents: int = 4096) -> Iterator[list[str]]:
    """Group documents into lists of about `chunk_chars` characters (a longer document is a chunk alone)."""
    chunk: list[str] = []
    size = 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= chunk_chars or len(chunk) >= max_documents:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(chunks: Iterator[list[str]], tokenizer: Tokenizer, workers: int, dtype: np.dtype,
                    val_fraction: float):
    """(encoded chunk, UTF-8 bytes of its text) in input order; in-process for one worker, else a bounded
    pipeline of processes."""
    if workers <= 1:
        for chunk in chunks:
            yield encode_chunk(tokenizer, chunk, dtype, val_fraction), _text_bytes(chunk)
        return
    # spawn: safe whatever threads the parent runs (torch, tqdm). An executor, unlike multiprocessing.Pool,
    # raises BrokenProcessPool when a worker dies instead of waiting forever.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(str(tokenizer.directory), os.getpid())) as pool:
        pending: collections.deque = collections.deque()
        try:
            for chunk in chunks:
                pending.append((pool.submit(_encode_in_worker, chunk, dtype.str, val_fraction), _text_bytes(chunk)))
                if len(pending) >= 2 * workers:
                    future, size = pending.popleft()
                    yield future.result(), size
            while pending:
                future, size = pending.popleft()
                yield future.result(), size
        except concurrent.futures.process.BrokenProcessPool as error:
            raise RuntimeError(f"a tokeniser worker process died ({error})") from error
        finally:
            for future, _ in pending:
                future.cancel()


def _text_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8", errors="surrogatepass")) for text in texts)


def _write_split(writer: shards.ShardWriter, tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> None:
    if keep.all():
        writer.write(tokens, lengths)
    elif keep.any():
        writer.write(tokens[np.repeat(keep, lengths)], lengths[keep])


def preprocess(sources: Sequence[str], tokenizer_dir: Path, out: Path, *, workers: int = 1,
               val_fraction: float = 0.0, val_sources: Sequence[str] = (),
               options: SourceOptions = SourceOptions(), progress: Optional[ProgressCallback] = None,
               chunk_chars: int = 1 << 20, max_tokens: Optional[int] = None) -> dict[str, Path]:
    """Tokenise `sources` into `out/train` (and `out/validation`). Returns {"train": path, ...}.

    `val_fraction` holds out that fraction of the training sources' documents; `val_sources` are
    tokenised into validation instead (give one or the other). `max_tokens` is a budget per source (training
    and validation sources alike): its first `max_tokens` tokens, the last document cut, then reading stops.
    `out` must not exist yet.
    """
    if not sources:
        raise DataError("no data source given")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1)")
    if val_fraction > 0.0 and val_sources:
        raise DataError("give either a validation fraction or validation sources, not both")
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    out = Path(out)
    if out.exists():
        raise DataError(f"output folder {out} already exists; choose a new one or remove it")
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = shards.token_dtype(tokenizer.vocab_size)
    train_sources = [open_source(spec, options) for spec in sources]
    validation_sources = [open_source(spec, options) for spec in val_sources]
    settings = {"options": options.describe(), "val_fraction": val_fraction, "max_tokens": max_tokens}

    def describe(group) -> str:
        return " + ".join(source.describe() for source in group)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shards.remove_stale_partials(out.parent)
        partial = shards.partial_dir(out)
        partial.mkdir()
    except OSError as error:
        raise DataError(f"cannot create output folder {out} ({error.strerror or type(error).__name__})") from None
    writers: list[shards.ShardWriter] = []
    try:
        train = shards.ShardWriter(partial / "train", tokenizer.vocab_size, tokenizer.eos_id, tokenizer.describe(),
                                   describe(train_sources), extra={"split": "train", "settings": settings})
        writers.append(train)
        validation = None
        if val_fraction > 0.0 or validation_sources:
            validation = shards.ShardWriter(
                partial / "validation", tokenizer.vocab_size, tokenizer.eos_id, tokenizer.describe(),
                describe(validation_sources or train_sources), extra={"split": "validation", "settings": settings})
            writers.append(validation)

        def run(group, writer, split_writer=None):
            fraction = val_fraction if split_writer is not None else 0.0
            # One source after the other, so that each stops at its own budget.
            for source in group:
                written = 0
                chunks = chunk_documents(source.documents(), chunk_chars)
                encoded = _encoded_chunks(chunks, tokenizer, workers, dtype, fraction)
                try:
                    for (tokens, lengths, mask), size in encoded:
                        if max_tokens is not None and written + tokens.size > max_tokens:
                            tokens, lengths, mask = truncate_chunk(tokens, lengths, mask, max_tokens - written)
                        written += int(tokens.size)
                        if mask is None:
                            writer.write(tokens, lengths)
                        else:
                            _write_split(writer, tokens, lengths, ~mask)
                            _write_split(split_writer, tokens, lengths, mask)
                        if progress is not None:
                            progress(int(tokens.size), int(lengths.size), size)
                        if max_tokens is not None and written >= max_tokens:
                            logger.info("%s: stopped at its budget of %d tokens", source.spec, max_tokens)
                            break
                finally:
                    encoded.close()  # stops the pool and its chunks in flight when the budget ends reading early

        run(train_sources, train, validation if val_fraction > 0.0 else None)
        if validation_sources:
            run(validation_sources, validation)
        results = {}
        for writer in writers:
            manifest = writer.finish()
            name = manifest["split"]
            if manifest["num_documents"] == 0:
                raise DataError(f"the {name} split is empty (val_fraction {val_fraction} of "
                                f"{train.num_documents + (validation.num_documents if validation else 0)} documents); "
                                f"use more data or another val_fraction")
            copy_tokenizer(tokenizer, writer.path / shards.TOKENIZER_SUBDIR)
            results[name] = out / name
            logger.info("%s: %d documents, %d tokens (%s)", out / name, manifest["num_documents"],
                        manifest["num_tokens"], manifest["dtype"])
        shards.commit_dir(partial, out)
        return results
    except BaseException:
        for writer in writers:
            writer.abort()
        shards.remove_partial(partial)
        raise
