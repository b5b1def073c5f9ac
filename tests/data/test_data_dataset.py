"""PackedDataset and ValidationDataset against obvious references. Shards hold token ids equal to their
own positions (plus a per-shard base), so every sample says where it came from."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from polycom_lm.data import PackedDataset, ValidationDataset
from polycom_lm.data.dataset import MIXTURE_BLOCK
from polycom_lm.data.shards import ShardWriter
from polycom_lm.errors import DataError

VOCAB = 1 << 20  # uint32, so position ids never wrap


def make_shard(path, document_lengths, base=0, identity="tok"):
    lengths = np.array(document_lengths, dtype=np.int64)
    writer = ShardWriter(path, vocab_size=VOCAB, eos_id=0, tokenizer={"identity": identity}, source="synthetic")
    writer.write(np.arange(base, base + lengths.sum(), dtype=np.uint32), lengths)
    writer.finish()
    return path


@pytest.fixture
def two_shards(tmp_path):
    a = make_shard(tmp_path / "a", [50, 7, 30, 113], base=0)  # 200 tokens
    b = make_shard(tmp_path / "b", [41] * 2, base=500_000)  # 82 tokens
    return a, b


def test_samples_are_windows_of_seq_len_plus_one_and_each_epoch_visits_every_sample_once(two_shards):
    seq_len = 16
    dataset = PackedDataset([(two_shards[0], 1.0)], seq_len=seq_len, seed=3)
    samples_per_epoch = (200 - 1) // seq_len
    starts = []
    for index in range(3 * samples_per_epoch):
        tokens, _ = dataset.sample(index)
        assert tokens.tolist() == list(range(tokens[0], tokens[0] + seq_len + 1))
        starts.append(int(tokens[0]))
    epochs = [starts[e * samples_per_epoch : (e + 1) * samples_per_epoch] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == [j * seq_len for j in range(samples_per_epoch)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    other_seed = PackedDataset([(two_shards[0], 1.0)], seq_len=seq_len, seed=4)
    assert [int(other_seed.sample(i)[0][0]) for i in range(samples_per_epoch)] != epochs[0]


def test_global_batch_is_the_same_for_any_world_size_and_resumes_from_samples_consumed(two_shards):
    dataset = PackedDataset([(two_shards[0], 2.0), (two_shards[1], 1.0)], seq_len=8, seed=0)
    reference = torch.stack([torch.from_numpy(dataset.sample(i)[0]) for i in range(40)])
    for world in (1, 2, 4):
        for consumed in (0, 8, 24):
            parts = [dataset.global_batch(consumed, 8, rank, world)["input_ids"] for rank in range(world)]
            assert all(part.shape == (8 // world, 9) and part.dtype == torch.long for part in parts)
            torch.testing.assert_close(torch.cat(parts), reference[consumed : consumed + 8], rtol=0, atol=0)
    fresh = PackedDataset([(two_shards[0], 2.0), (two_shards[1], 1.0)], seq_len=8, seed=0)
    torch.testing.assert_close(fresh.global_batch(24, 8, 1, 2)["input_ids"], reference[28:32], rtol=0, atol=0)


def test_mixture_follows_the_weights_exactly_per_block(two_shards):
    dataset = PackedDataset([(two_shards[0], 3.0), (two_shards[1], 1.0)], seq_len=8, seed=1)
    owners = Counter(dataset.locate(i)[0] for i in range(2 * MIXTURE_BLOCK))
    assert owners == {0: 2 * MIXTURE_BLOCK * 3 // 4, 1: 2 * MIXTURE_BLOCK // 4}
    # The small shard (10 samples per epoch) is repeated: each of its epochs is a permutation.
    starts = [dataset.locate(i)[1] for i in range(2 * MIXTURE_BLOCK) if dataset.locate(i)[0] == 1]
    for epoch in range(len(starts) // 10):
        assert sorted(starts[epoch * 10 : (epoch + 1) * 10]) == [j * 8 for j in range(10)]


def test_document_ids_count_boundaries_within_each_sample(tmp_path):
    lengths = [5, 3, 20, 1, 1, 30]
    shard = make_shard(tmp_path / "d", lengths)
    dataset = PackedDataset([(shard, 1.0)], seq_len=9, seed=0, document_ids=True)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # document of every token position
    batch = dataset.global_batch(0, 6, 0, 1)
    for row in range(6):
        positions = batch["input_ids"][row].numpy()
        expected = owner[positions] - owner[positions[0]]
        assert batch["document_ids"][row].tolist() == expected.tolist()
    assert "document_ids" not in PackedDataset([(shard, 1.0)], seq_len=9, seed=0).global_batch(0, 2, 0, 1)


def test_vocab_size_and_tokenizer_consistency(two_shards, tmp_path):
    assert PackedDataset([(two_shards[0], 1.0)], seq_len=4, seed=0).vocab_size == VOCAB
    other = make_shard(tmp_path / "c", [40], identity="another")
    with pytest.raises(DataError, match="needs one tokenizer"):
        PackedDataset([(two_shards[0], 1.0), (other, 1.0)], seq_len=4, seed=0)
    with pytest.raises(DataError, match="too few for one sample"):
        PackedDataset([(two_shards[1], 1.0)], seq_len=100, seed=0)
    with pytest.raises(DataError, match="must be positive"):
        PackedDataset([(two_shards[0], 0.0)], seq_len=4, seed=0)


def test_validation_reads_fixed_order_disjoint_slices_dropping_the_partial_sample(two_shards):
    validation = ValidationDataset(two_shards[0], seq_len=16)
    assert validation.num_samples == 12  # 199 target tokens: 12 full samples, the partial 13th is dropped
    everything = torch.cat([b["input_ids"] for b in validation.batches(5, 0, 1)])
    assert everything[:, 0].tolist() == [16 * j for j in range(12)]
    assert everything[3].tolist() == list(range(48, 65))
    for world in (2, 3, 5):
        per_rank = [torch.cat([b["input_ids"] for b in validation.batches(2, rank, world)]) for rank in range(world)]
        assert len({len(part) for part in per_rank}) == 1  # same batch count on every rank
        torch.testing.assert_close(torch.cat(per_rank), everything[: 12 // world * world], rtol=0, atol=0)
    capped = torch.cat([b["input_ids"] for b in validation.batches(4, 0, 1, max_tokens=80)])
    assert capped.shape == (5, 17)


def _distributed_worker(rank, world, init_file, shard, result_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dataset = PackedDataset([(shard, 1.0)], seq_len=8, seed=5)
    local = dataset.global_batch(12, 8, rank, world)["input_ids"]
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    if rank == 0:
        torch.save(torch.cat(gathered), result_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_real_ranks_read_the_single_process_global_batch(two_shards, tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = tmp_path / "gathered.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), two_shards[0], str(result)), nprocs=2, join=True)
    expected = PackedDataset([(two_shards[0], 1.0)], seq_len=8, seed=5).global_batch(12, 8, 0, 1)["input_ids"]
    torch.testing.assert_close(torch.load(result), expected, rtol=0, atol=0)


def test_many_shard_mixture_keeps_every_current_permutation_cached(tmp_path):
    paths = [make_shard(tmp_path / f"s{i}", [801], base=1000 * i) for i in range(20)]  # 100 samples each
    dataset = PackedDataset([(path, 1.0) for path in paths], seq_len=8, seed=0)
    dataset.global_batch(0, 128, 0, 1)
    calls = []
    original = np.random.default_rng
    try:
        np.random.default_rng = lambda *args: calls.append(args) or original(*args)
        dataset.global_batch(0, 128, 0, 1)  # every shard's epoch-0 order is still cached
    finally:
        np.random.default_rng = original
    assert calls == []
    owners = {int(dataset.sample(i)[0][0]) // 1000 for i in range(128)}
    assert owners == set(range(20))
