"""The process that feeds a `StreamingDataset` (one per training rank): it reads the rank's share of every
streamed source (`Source.stream`), tokenises chunks of documents in a pool of tokeniser processes (in
order, a few chunks in flight per source), packs them into windows (`packing.py`), takes windows from the
sources in the weighted mixture's order (`mixture.py`) and puts whole batches on a queue, each with the
position just after it. Sources that are shard folders join the mixture as windows read from disk.

It imports no torch, so it starts in about a second. It stops when told, when the queue's reader is gone,
and with its parent (a SIGKILLed trainer leaves no process behind: the kernel's parent-death signal on
Linux, a watchdog elsewhere), and its tokeniser processes die with it the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import queue as queue_module
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from polycom_lm.data import preprocess
from polycom_lm.data.mixture import MIXTURE_BLOCK, block_layout, checked_counts, epoch_order
from polycom_lm.data.packing import TokenChunk, WindowPacker
from polycom_lm.data.shards import document_ids, read_shard, token_dtype
from polycom_lm.data.sources import SourceOptions, open_source
from polycom_lm.data.tokenizer import load_tokenizer
from polycom_lm.errors import DataError, PolycomError

STATE_FORMAT = "polycom_lm.stream_position"
STATE_VERSION = 1
CHUNK_CHARS = 1 << 16  # small chunks: the first batch is ready after a few of them
CHUNK_DOCUMENTS = 1024


@dataclass(frozen=True)
class StreamedSource:
    """A raw training source tokenised while training (`data.train[].streaming`)."""

    spec: str
    options: SourceOptions
    max_tokens: Optional[int] = None  # per epoch over all ranks; each rank streams its share


@dataclass(frozen=True)
class StreamPlan:
    """Everything the process needs (pickled to it)."""

    sources: tuple[tuple[Any, float], ...]  # (StreamedSource or shard folder path, weight)
    tokenizer_dir: str
    seq_len: int
    seed: int
    shuffle: bool
    document_ids: bool
    rank: int
    world_size: int
    rows: int  # windows per batch: this rank's share of the global batch
    workers: int  # tokeniser processes (0: tokenise in this process)
    state: Optional[dict]  # where to resume (the position saved with a batch), or None


def location(source: Any) -> str:
    """The name a source's position is saved under."""
    return source.spec if isinstance(source, StreamedSource) else str(source)


class _StreamWindows:
    """Windows of one streamed source for one rank: reader → tokeniser pool → packer, epoch after epoch."""

    def __init__(self, source: StreamedSource, plan: StreamPlan, tokenizer, pool, state: Optional[dict]):
        self.source = open_source(source.spec, source.options)
        self.spec = source.spec
        self.plan = plan
        self.tokenizer = tokenizer
        self.pool = pool
        self.dtype = token_dtype(tokenizer.vocab_size)
        budget = None if source.max_tokens is None else max(1, source.max_tokens // plan.world_size)
        self.packer = WindowPacker(plan.seq_len, budget, plan.document_ids)
        self.pending: collections.deque = collections.deque()
        self.epoch = int(state["epoch"]) if state else 0
        self._start_epoch(state if state and "reader" in state else None)

    def _start_epoch(self, resume: Optional[dict]) -> None:
        for _, _, pending in self.pending:
            if isinstance(pending, concurrent.futures.Future):
                pending.cancel()
        self.pending.clear()
        reader = resume["reader"] if resume else None
        skip = int(resume["documents"]) if resume else 0
        self.stream = self.source.stream(self.plan.rank, self.plan.world_size, reader)
        self.documents = iter(self.stream)
        for _ in range(skip):
            if next(self.documents, None) is None:
                raise DataError(f"source {self.spec!r} has fewer documents than the saved stream position says; "
                                f"did it change since the checkpoint?")
        if resume:
            self.packer.reset(int(resume["epoch_tokens"]), int(resume["tokens"]))
        else:
            self.packer.reset()
        self.chunks = self._chunks(reader, skip)
        self.exhausted = False

    def _chunks(self, reader: Any, skip: int):
        """(reader position before the chunk, documents already read from it, texts), in order."""
        while True:
            texts: list[str] = []
            size = 0
            for text in self.documents:
                texts.append(text)
                size += len(text)
                if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCUMENTS:
                    break
            if not texts:
                return
            yield reader, skip, texts
            reader, skip = self.stream.position(), 0

    def _fill(self) -> None:
        depth = 2 * max(1, self.plan.workers)
        while not self.exhausted and len(self.pending) < depth:
            item = next(self.chunks, None)
            if item is None:
                self.exhausted = True
                return
            reader, skip, texts = item
            if self.pool is None:
                encoded: Any = preprocess.encode_chunk(self.tokenizer, texts, self.dtype, 0.0)
            else:
                encoded = self.pool.submit(preprocess._encode_in_worker, texts, self.dtype.str, 0.0)
            self.pending.append((reader, skip, encoded))

    def _next_chunk(self) -> Optional[TokenChunk]:
        self._fill()
        if not self.pending:
            return None
        reader, skip, encoded = self.pending.popleft()
        tokens, lengths, _ = encoded.result() if isinstance(encoded, concurrent.futures.Future) else encoded
        self._fill()  # keep the pool busy while this chunk is packed
        return TokenChunk(reader, skip, tokens, lengths)

    def next_window(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        length = self.plan.seq_len + 1
        while self.packer.available() < length:
            chunk = None if self.packer.full else self._next_chunk()
            if chunk is None:  # the epoch ends: the stream ran out or the budget is used up
                if self.packer.epoch_tokens == 0:
                    raise DataError(f"source {self.spec!r}: rank {self.plan.rank} of {self.plan.world_size} gets "
                                    f"fewer than {length} tokens per epoch (one sample of seq_len + 1)")
                self.epoch += 1
                self._start_epoch(None)
                continue
            self.packer.add(chunk)
        return self.packer.take()

    def state(self) -> dict:
        return {"epoch": self.epoch, **(self.packer.position() or {})}


class _ShardWindows:
    """Windows of a shard folder in the streaming mixture: rank `r` takes samples `r, r + world_size, ...` of
    the epochs' orders (shuffled per epoch as `PackedDataset` does, or in file order)."""

    def __init__(self, path: Path, number: int, plan: StreamPlan, state: Optional[dict]):
        self.shard = read_shard(path)
        self.number, self.plan = number, plan
        self.samples = (self.shard.num_tokens - 1) // plan.seq_len
        if self.samples == 0:
            raise DataError(f"{path}: {self.shard.num_tokens} tokens are too few for one sample of {plan.seq_len + 1}")
        self.index = int(state["index"]) if state else 0
        self._orders: dict[int, np.ndarray] = {}

    def next_window(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        epoch, position = divmod(self.index * self.plan.world_size + self.plan.rank, self.samples)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.samples, self.plan.seed, self.number, epoch, self.plan.shuffle)}
        start = int(self._orders[epoch][position]) * self.plan.seq_len
        self.index += 1
        tokens = np.asarray(self.shard.tokens[start:start + self.plan.seq_len + 1], dtype=np.int64)
        return tokens, document_ids(self.shard, start, self.plan.seq_len + 1) if self.plan.document_ids else None

    def state(self) -> dict:
        return {"index": self.index}


def _put(queue, item, stop, parent: int) -> bool:
    """Put `item` unless told to stop or orphaned; False when given up."""
    while not stop.is_set() and os.getppid() == parent:
        try:
            queue.put(item, timeout=0.5)
            return True
        except queue_module.Full:
            continue
    return False


def run(plan: StreamPlan, queue, stop, parent: int) -> None:
    """The process's body: batches `("batch", tokens [rows, seq_len + 1], document ids or None, state)`
    until `stop` is set; a user error ends it with `("error", message)`, anything else with
    `("crash", traceback)`."""
    preprocess._die_with_parent(parent)
    pool = None
    delivered = True
    try:
        saved = {entry["location"]: entry["state"] for entry in (plan.state or {}).get("sources", [])}
        counts = checked_counts([weight for _, weight in plan.sources], [location(s) for s, _ in plan.sources])
        tokenizer = load_tokenizer(plan.tokenizer_dir)
        if plan.workers > 0 and any(isinstance(source, StreamedSource) for source, _ in plan.sources):
            # The tokenisers die with this process as it dies with the trainer (`preprocess._die_with_parent`).
            pool = concurrent.futures.ProcessPoolExecutor(
                plan.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=preprocess._init_worker, initargs=(plan.tokenizer_dir, os.getpid()))
        sources = [
            _StreamWindows(source, plan, tokenizer, pool, saved.get(location(source)))
            if isinstance(source, StreamedSource) else _ShardWindows(Path(source), number, plan, saved.get(location(source)))
            for number, (source, _) in enumerate(plan.sources)
        ]
        windows = int((plan.state or {}).get("windows", 0))
        layout: tuple[int, np.ndarray] = (-1, np.empty(0))
        while not stop.is_set():
            rows = []
            for _ in range(plan.rows):
                block, offset = divmod(windows, MIXTURE_BLOCK)
                if layout[0] != block:
                    layout = (block, block_layout(counts, plan.seed, block)[0])
                rows.append(sources[int(layout[1][offset])].next_window())
                windows += 1
            tokens = np.stack([row[0] for row in rows])
            documents = np.stack([row[1] for row in rows]) if plan.document_ids else None
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, "rank": plan.rank,
                     "world_size": plan.world_size, "windows": windows,
                     "sources": [{"location": location(source), "state": windows_of.state()}
                                 for (source, _), windows_of in zip(plan.sources, sources)]}
            if not _put(queue, ("batch", tokens, documents, state), stop, parent):
                delivered = False
                break
    except PolycomError as error:
        _put(queue, ("error", str(error)), stop, parent)
    except concurrent.futures.process.BrokenProcessPool:
        _put(queue, ("error", f"a tokeniser process of the streaming data of rank {plan.rank} died (killed, or out "
                              f"of memory); training stopped: run the same command to resume from the last checkpoint"),
             stop, parent)
    except BaseException:
        _put(queue, ("crash", traceback.format_exc()), stop, parent)
    finally:
        if pool is not None:
            # Waiting lets tokenisers still starting up finish starting: one that starts after this process
            # is gone cannot attach to its queues and dies with a traceback.
            pool.shutdown(wait=True, cancel_futures=True)
        if not delivered or stop.is_set():
            queue.cancel_join_thread()  # nobody reads any more: do not wait to flush
