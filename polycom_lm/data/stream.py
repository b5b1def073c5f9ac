"""Training on data tokenised on the fly: `StreamingDataset`, and `build_train_dataset`, which picks it or
`PackedDataset` for a run.

A `StreamingDataset` serves the training loop like `PackedDataset` (`global_batch(consumed_samples,
global_batch_size, dp_rank, dp_world_size)`), but its batches come from a process of its own
(`stream_worker.py`) that reads, tokenises and packs this rank's share of the sources while the model
trains. Every batch arrives with the position just after it; `state_dict()` is the position after the last
batch handed to the loop (not after the ones prefetched), and a checkpoint saves it next to the trainer
state, so `load_state_dict()` + the same world size resume at exactly the next token.

What it guarantees:
- one data-parallel rank: the batches equal `PackedDataset(..., shuffle=False)` over the same documents
  tokenised offline (sources read in order, windows packed the same way, mixtures by the same blocks);
- several ranks: each rank reads a disjoint share of every source (whole files of a hub dataset when their
  count divides among the ranks, else every `world_size`-th document), so the global batch depends on the
  number of ranks (unlike `PackedDataset`'s); a run resumes exactly on the same number of ranks and is
  refused on another.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import queue as queue_module
from pathlib import Path
from typing import Any, Optional, Union

import torch

from polycom_lm.data.dataset import PackedDataset
from polycom_lm.data.mixture import checked_counts
from polycom_lm.data.shards import read_shard
from polycom_lm.data.stream_worker import STATE_FORMAT, STATE_VERSION, StreamedSource, StreamPlan, location, run
from polycom_lm.data.tokenizer import load_tokenizer
from polycom_lm.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

TrainSource = tuple[Union[Path, StreamedSource], float]  # a shard folder or a stream, with its weight


def _stop(process, stop, queue) -> None:
    """Stop the producer: ask, unblock its pending put, then insist."""
    stop.set()
    try:
        while True:
            queue.get_nowait()
    except (queue_module.Empty, OSError, ValueError):
        pass
    process.join(timeout=10)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)


class StreamingDataset:
    """See the module docstring.

    Args:
        sources: (shard folder or `StreamedSource`, weight) pairs.
        tokenizer_dir: the tokenizer every source is tokenised with.
        seq_len: model input tokens per sample; samples hold `seq_len + 1`.
        seed: the mixture order (and shard folders' epochs, with `shuffle`).
        document_ids: also return per-token document numbers.
        shuffle: shard folders in the mixture visit their samples in a seeded order per epoch; streamed
            sources are always read in their own order.
        workers: tokeniser processes per rank (0: tokenise in the producer process itself).
        prefetch_batches: batches the producer may run ahead of the loop.
    """

    def __init__(self, sources: list[TrainSource], tokenizer_dir: Path, seq_len: int, seed: int, *,
                 document_ids: bool = False, shuffle: bool = True, workers: int = 2, prefetch_batches: int = 4):
        if not sources:
            raise DataError("no training sources given")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        if workers < 0:
            raise DataError(f"data.stream_workers must be >= 0, got {workers}")
        checked_counts([weight for _, weight in sources], [location(source) for source, _ in sources])
        tokenizer = load_tokenizer(tokenizer_dir)
        for source, _ in sources:
            if not isinstance(source, StreamedSource) and read_shard(Path(source)).tokenizer_identity != tokenizer.identity:
                raise DataError(f"{source} was not tokenised with {tokenizer_dir}; a mixture needs one tokenizer")
        self.sources = [(source if isinstance(source, StreamedSource) else str(source), float(weight))
                        for source, weight in sources]
        self.tokenizer_dir = Path(tokenizer_dir)
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.with_document_ids = document_ids
        self.workers, self.prefetch_batches = workers, prefetch_batches
        self._state: Optional[dict] = None
        self._process = None
        self._layout: Optional[tuple[int, int, int]] = None  # (rank, world size, rows) the producer serves

    # ------------------------------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned (JSON-able); the start before the first one."""
        if self._state is not None:
            return dict(self._state)
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "samples": 0, "windows": 0, "sources": []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` (from `state_dict()`); before the first batch only."""
        if self._process is not None:
            raise RuntimeError("load_state_dict must come before the first global_batch")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"not a stream position (expected \"format\": \"{STATE_FORMAT}\")")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"stream position version {state.get('version')!r} is not supported "
                                  f"(this version reads {STATE_VERSION})")
        known = {location(source) for source, _ in self.sources}
        for entry in state.get("sources", []):
            if entry["location"] not in known:
                logger.warning("the saved stream position of %s is dropped: it is no longer a training source",
                               entry["location"])
        for source, _ in self.sources:
            if state.get("sources") and location(source) not in {e["location"] for e in state["sources"]}:
                logger.warning("training source %s has no saved position: it starts from its beginning",
                               location(source))
        self._state = dict(state)

    # ---------------------------------------------------------------------------------------- batches
    def _start(self, dp_rank: int, dp_world_size: int, rows: int, consumed_samples: int) -> None:
        state = self._state
        if state is not None and state.get("sources"):
            if (state.get("rank"), state.get("world_size")) != (dp_rank, dp_world_size):
                raise CheckpointError(
                    f"the streamed data position was saved by data-parallel rank {state.get('rank')} of "
                    f"{state.get('world_size')}; a stream's share cannot be re-split: resume on "
                    f"{state.get('world_size')} data-parallel ranks (or preprocess the data to change the number)")
            if int(state.get("samples", 0)) != consumed_samples:
                raise CheckpointError(f"the streamed data position is at sample {state.get('samples')} but the "
                                      f"trainer resumes at sample {consumed_samples}")
        elif consumed_samples:
            logger.warning("no streamed data position for sample %d: every streamed source starts from its "
                           "beginning", consumed_samples)
        self._state = {**self.state_dict(), "samples": consumed_samples}
        plan = StreamPlan(tuple(self.sources), str(self.tokenizer_dir), self.seq_len, self.seed, self.shuffle,
                          self.with_document_ids, dp_rank, dp_world_size, rows, self.workers,
                          state if state and state.get("sources") else None)
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue(maxsize=self.prefetch_batches)
        self._stop_event = context.Event()
        # Not a daemon: it runs a pool of tokeniser processes. It stops with `close()`, at interpreter exit
        # (the finalizer) or with this process (see stream_worker).
        self._process = context.Process(target=run, args=(plan, self._queue, self._stop_event, os.getpid()),
                                        name=f"polycom-stream-{dp_rank}", daemon=False)
        self._process.start()
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop, args=(self._process, self._stop_event, self._queue), exitpriority=10)
        self._layout = (dp_rank, dp_world_size, rows)
        logger.info("streaming data: %d source(s), rank %d of %d, %d tokeniser process(es)",
                    len(self.sources), dp_rank, dp_world_size, self.workers)

    def _receive(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue_module.Empty:
                if not self._process.is_alive():
                    code = self._process.exitcode
                    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
                    raise DataError(f"the streaming data process of data-parallel rank {self._layout[0]} died ({how}) "
                                    f"without a batch; training stopped: run the same command to resume from the last "
                                    f"checkpoint") from None

    def global_batch(self, consumed_samples: int, global_batch_size: int, dp_rank: int,
                     dp_world_size: int) -> dict[str, torch.Tensor]:
        """This rank's next `global_batch_size // dp_world_size` samples: {"input_ids": LongTensor
        [rows, seq_len + 1]} and, with `document_ids`, "document_ids" of the same shape."""
        if global_batch_size % dp_world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {dp_world_size} ranks")
        rows = global_batch_size // dp_world_size
        if self._process is None:
            self._start(dp_rank, dp_world_size, rows, consumed_samples)
        elif self._layout != (dp_rank, dp_world_size, rows):
            raise ValueError(f"the stream serves {self._layout} (rank, ranks, rows), not "
                             f"{(dp_rank, dp_world_size, rows)}")
        elif consumed_samples != self._state["samples"]:
            raise ValueError(f"a stream is read in order: next sample {self._state['samples']}, asked for "
                             f"{consumed_samples}")
        message = self._receive()
        if message[0] == "error":
            raise DataError(message[1])
        if message[0] == "crash":  # a bug: its traceback, logged, and one line for the user
            logger.error("the streaming data process failed:\n%s", message[1])
            raise DataError(f"the streaming data process of data-parallel rank {dp_rank} failed "
                            f"({message[1].strip().splitlines()[-1]}); its traceback is in the log above")
        _, tokens, documents, state = message
        self._state = {**state, "samples": consumed_samples + global_batch_size}
        batch = {"input_ids": torch.from_numpy(tokens)}
        if documents is not None:
            batch["document_ids"] = torch.from_numpy(documents)
        return batch

    def close(self) -> None:
        """Stop the producer process (and its tokenisers); the position stays readable."""
        if self._process is not None:
            self._finalizer()
            self._process = None


def build_train_dataset(sources: list[TrainSource], tokenizer_dir: Path, seq_len: int, seed: int, *,
                        document_ids: bool = False, shuffle: bool = True, workers: int = 2):
    """`PackedDataset` when every source is a shard folder (positions independent of the number of ranks),
    else a `StreamingDataset` over all of them."""
    if all(not isinstance(source, StreamedSource) for source, _ in sources):
        return PackedDataset([(Path(source), weight) for source, weight in sources], seq_len, seed,
                             document_ids=document_ids, shuffle=shuffle)
    return StreamingDataset(sources, tokenizer_dir, seq_len, seed, document_ids=document_ids, shuffle=shuffle,
                            workers=workers)
