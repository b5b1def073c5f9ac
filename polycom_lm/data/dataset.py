"""Training-time datasets over memory-mapped token shards.

`PackedDataset`: a weighted mixture of shard folders, cut into fixed-length samples of `seq_len + 1`
tokens that run across document boundaries (the inputs are the first `seq_len`, the targets the last).
Sample `j` of a shard is `tokens[j * seq_len : j * seq_len + seq_len + 1]` (consecutive samples share one
token, so every token but the first is a target exactly once per epoch).

Global sample `g` is mapped without any state:
1. mixture: `g` falls in block `g // MIXTURE_BLOCK`; each block holds a fixed count of samples of every
   shard (the weights, rounded by largest remainder), in an order shuffled by (seed, block); so the
   `i`-th sample of shard `s` in a block is that shard's sample number `block * count[s] + i` (`mixture.py`);
2. epochs: shard-local sample number `k` is position `k % n` of epoch `k // n` of that shard (`n` its
   samples per epoch), and each epoch visits the shard's samples in a permutation seeded by
   (seed, shard, epoch), or in file order with `shuffle=False`. Small shards with large weights are
   therefore repeated, reshuffled each time.

The sampler's whole state is the number of global samples consumed: the same global batch comes out for
any number of data-parallel ranks, and each rank reads its own contiguous slice of it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from polycom_lm.data.mixture import MIXTURE_BLOCK, block_layout, checked_counts, epoch_order
from polycom_lm.data.shards import Shard, document_ids, read_shard
from polycom_lm.errors import DataError

logger = logging.getLogger(__name__)


def _open_consistent(paths: list[Path]) -> list[Shard]:
    opened = [read_shard(Path(path)) for path in paths]
    first = opened[0]
    for shard in opened[1:]:
        if shard.tokenizer_identity != first.tokenizer_identity:
            raise DataError(
                f"{shard.path} was tokenised with tokenizer {shard.tokenizer_identity} but {first.path} with "
                f"{first.tokenizer_identity}; a mixture needs one tokenizer"
            )
    return opened


class PackedDataset:
    """A resumable, shuffled, weighted mixture of packed samples. See the module docstring.

    Args:
        shards: (shard folder, weight) pairs; weights are relative (any positive numbers).
        seq_len: tokens of model input per sample; samples hold `seq_len + 1` tokens.
        seed: shuffles the mixture order and (with `shuffle`) every shard's epochs.
        document_ids: also return per-token document numbers (for document-masked attention).
        shuffle: visit each epoch's samples in a seeded random order; False: in file order.
    """

    def __init__(self, shards: list[tuple[Path, float]], seq_len: int, seed: int, document_ids: bool = False,
                 shuffle: bool = True):
        if not shards:
            raise DataError("no training shards given")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.block_counts = checked_counts([weight for _, weight in shards], [str(path) for path, _ in shards])
        weights = np.array([float(weight) for _, weight in shards], dtype=np.float64)
        self.shards = _open_consistent([Path(path) for path, _ in shards])
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.with_document_ids = document_ids
        self.samples_per_epoch = np.array([(shard.num_tokens - 1) // seq_len for shard in self.shards], dtype=np.int64)
        for shard, count in zip(self.shards, self.samples_per_epoch):
            if count == 0:
                raise DataError(f"{shard.path}: {shard.num_tokens} tokens are too few for one sample of {seq_len + 1}")
        self.weights = weights / weights.sum()
        self.vocab_size = self.shards[0].vocab_size
        self.eos_id = int(self.shards[0].manifest["eos_id"])
        self.tokenizer_dir = self.shards[0].tokenizer_dir
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._permutations: list[dict[int, np.ndarray]] = [{} for _ in self.shards]
        logger.info("packed dataset: %d shard(s), %s samples per epoch, seq_len %d",
                    len(self.shards), self.samples_per_epoch.tolist(), seq_len)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard of each position [MIXTURE_BLOCK], rank of the position among its shard's in the block)."""
        if block in self._blocks:
            return self._blocks[block]
        owners, ranks = block_layout(self.block_counts, self.seed, block)
        if len(self._blocks) >= 4:  # a global batch spans at most a few consecutive blocks
            self._blocks.pop(next(iter(self._blocks)))
        self._blocks[block] = (owners, ranks)
        return owners, ranks

    def _permutation(self, shard: int, epoch: int) -> np.ndarray:
        """The order of shard `shard`'s samples in `epoch`. Two epochs per shard stay cached (reads cross
        an epoch boundary), whatever the number of shards: every block touches every shard."""
        cached = self._permutations[shard]
        if epoch not in cached:
            if len(cached) >= 2:
                cached.pop(next(iter(cached)))
            cached[epoch] = epoch_order(int(self.samples_per_epoch[shard]), self.seed, shard, epoch, self.shuffle)
        return cached[epoch]

    def locate(self, global_index: int) -> tuple[int, int]:
        """(shard number, index of the sample's first token in that shard) for global sample `global_index`."""
        if global_index < 0:
            raise IndexError(f"global sample index {global_index} is negative")
        block, offset = divmod(int(global_index), MIXTURE_BLOCK)
        owners, ranks = self._block(block)
        shard = int(owners[offset])
        local = block * int(self.block_counts[shard]) + int(ranks[offset])
        epoch, position = divmod(local, int(self.samples_per_epoch[shard]))
        sample = int(self._permutation(shard, epoch)[position])
        return shard, sample * self.seq_len

    def sample(self, global_index: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Tokens [seq_len + 1] int64 of global sample `global_index`, and its document ids when asked."""
        shard_number, start = self.locate(global_index)
        shard = self.shards[shard_number]
        tokens = np.asarray(shard.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        documents = document_ids(shard, start, self.seq_len + 1) if self.with_document_ids else None
        return tokens, documents

    def state_dict(self) -> dict:
        """Empty: the whole position is the trainer's `consumed_samples` (the training-dataset protocol that
        `StreamingDataset` shares: `global_batch`, `state_dict`, `load_state_dict`, `close`)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see `state_dict`)."""

    def close(self) -> None:
        """Nothing to release: the shards are memory-mapped."""

    def global_batch(self, consumed_samples: int, global_batch_size: int, dp_rank: int,
                     dp_world_size: int) -> dict[str, torch.Tensor]:
        """This rank's slice of the global batch of samples `consumed_samples ... + global_batch_size - 1`.

        Returns {"input_ids": LongTensor [global_batch_size // dp_world_size, seq_len + 1]} and, when the
        dataset was built with `document_ids=True`, "document_ids" of the same shape (0 for the first
        document of each sample, counting up at every document boundary).
        """
        if global_batch_size % dp_world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {dp_world_size} ranks")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_world_size - 1}")
        per_rank = global_batch_size // dp_world_size
        first = consumed_samples + dp_rank * per_rank
        tokens = np.empty((per_rank, self.seq_len + 1), dtype=np.int64)
        documents = np.empty_like(tokens) if self.with_document_ids else None
        for row in range(per_rank):
            tokens[row], sample_documents = self.sample(first + row)
            if documents is not None:
                documents[row] = sample_documents
        batch = {"input_ids": torch.from_numpy(tokens)}
        if documents is not None:
            batch["document_ids"] = torch.from_numpy(documents)
        return batch


class ValidationDataset:
    """A validation shard read in a fixed order, as non-overlapping samples of `seq_len + 1` tokens
    (sample `j` = `tokens[j * seq_len : j * seq_len + seq_len + 1]`). The last partial sample is dropped."""

    def __init__(self, shard: Path, seq_len: int):
        self.shard = read_shard(Path(shard))
        self.seq_len = seq_len
        self.num_samples = (self.shard.num_tokens - 1) // seq_len
        if self.num_samples == 0:
            raise DataError(f"{shard}: {self.shard.num_tokens} tokens are too few for one sample of {seq_len + 1}")
        self.vocab_size = self.shard.vocab_size

    def batches(self, micro_batch_size: int, dp_rank: int, dp_world_size: int,
                max_tokens: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"input_ids": LongTensor [b, seq_len + 1]} with b <= micro_batch_size (only the last is
        smaller). `max_tokens` caps the set (over all ranks) at `max_tokens // seq_len` samples. Rank `r`
        reads the `r`-th contiguous share; the at most `dp_world_size - 1` samples that do not divide
        evenly are dropped, so every rank yields the same number of batches of the same sizes (collectives
        in the evaluation loop stay matched)."""
        total = self.num_samples
        if max_tokens is not None:
            total = min(total, max(1, max_tokens // self.seq_len))
        per_rank = total // dp_world_size
        if per_rank == 0:
            raise DataError(f"{self.shard.path}: {total} validation samples cannot be split over {dp_world_size} ranks")
        begin = dp_rank * per_rank
        for start in range(begin, begin + per_rank, micro_batch_size):
            stop = min(start + micro_batch_size, begin + per_rank)
            first_token = start * self.seq_len
            span = np.asarray(self.shard.tokens[first_token : stop * self.seq_len + 1], dtype=np.int64)
            rows = np.lib.stride_tricks.sliding_window_view(span, self.seq_len + 1)[:: self.seq_len]
            yield {"input_ids": torch.from_numpy(rows.copy())}
