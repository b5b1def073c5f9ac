"""Which source each sample of a weighted mixture comes from, without any state.

Samples are grouped in blocks of `MIXTURE_BLOCK`; each block holds a fixed count of samples of every source
(the weights, rounded by largest remainder), in an order shuffled by (seed, block). So the `i`-th sample of
source `s` in block `b` is that source's sample number `b * count[s] + i`. `PackedDataset` indexes this by
global sample number; the streaming pipeline by its rank's window number.
"""

from __future__ import annotations

import numpy as np

from polycom_lm.errors import DataError

MIXTURE_BLOCK = 4096


def block_counts(weights: np.ndarray, block: int = MIXTURE_BLOCK) -> np.ndarray:
    """Integer samples per source in one block, proportional to `weights` (largest remainder)."""
    exact = weights / weights.sum() * block
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: block - counts.sum()]] += 1
    return counts


def checked_counts(weights: list[float], names: list[str]) -> np.ndarray:
    """`block_counts` of positive `weights`; DataError naming the source whose weight is bad or too small."""
    array = np.array([float(weight) for weight in weights], dtype=np.float64)
    for name, weight in zip(names, weights):
        if not weight > 0:
            raise DataError(f"{name}: mixture weight {weight} must be positive")
    counts = block_counts(array)
    for name, count, weight in zip(names, counts, array / array.sum()):
        if count == 0:
            raise DataError(f"{name}: weight fraction {weight:.2e} is below the mixture's resolution 1/{MIXTURE_BLOCK}")
    return counts


def block_layout(counts: np.ndarray, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each position [MIXTURE_BLOCK], rank of the position among its source's in the block)."""
    owners = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D6978, block]))
    owners = owners[rng.permutation(MIXTURE_BLOCK)]
    ranks = np.empty(MIXTURE_BLOCK, dtype=np.int64)
    for source in range(len(counts)):
        where = owners == source
        ranks[where] = np.arange(int(where.sum()))
    return owners, ranks


def epoch_order(samples: int, seed: int, source: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch `epoch` of source `source` visits its `samples` samples."""
    if not shuffle:
        return np.arange(samples, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, source, epoch]))
    return rng.permutation(samples)
