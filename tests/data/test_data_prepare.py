"""prepare_run_data: raw sources are tokenised once into the cache and reused; prepared folders pass
through; the main process builds while the others wait; failures never hang the others."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from data_helpers import make_documents, reference_tokens, write_text_files

from polycom_lm.config import DataConfig, DataSourceConfig, TokenizerConfig, ValidationSetConfig
from polycom_lm.data import PackedDataset, load_tokenizer, prepare_run_data, read_shard
from polycom_lm.data import prepare as prepare_module
from polycom_lm.data.preprocess import preprocess
from polycom_lm.errors import DataError


def data_config(tmp_path, *sources, **overrides) -> DataConfig:
    config = DataConfig(train=[DataSourceConfig(source=str(s)) for s in sources], cache_dir=str(tmp_path / "cache"),
                        tokenizer=TokenizerConfig(vocab_size=320), preprocess_workers=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def no_barrier() -> None:
    pass


def test_raw_source_trains_a_tokenizer_tokenises_holds_out_and_is_reused(tmp_path, monkeypatch):
    documents = make_documents(80)
    write_text_files(tmp_path / "corpus", documents)
    config = data_config(tmp_path, tmp_path / "corpus", val_fraction=0.2)
    prepared = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    assert prepared.vocab_size == tokenizer.vocab_size and prepared.eos_id == tokenizer.eos_id == 2
    (train, weight), = prepared.train
    assert weight == 1.0 and set(prepared.validation) == {"validation"}
    train_tokens = len(read_shard(train).tokens) + len(read_shard(prepared.validation["validation"]).tokens)
    assert train_tokens == len(reference_tokens(tokenizer, documents))

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare_module, "preprocess", fail)
    monkeypatch.setattr(prepare_module, "train_sentencepiece", fail)
    again = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    assert again == prepared
    assert prepare_run_data(config, is_main_process=False, barrier=no_barrier) == prepared


def test_edited_source_is_retokenised(tmp_path):
    write_text_files(tmp_path / "corpus", make_documents(30))
    config = data_config(tmp_path, tmp_path / "corpus")
    first = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    (tmp_path / "corpus" / "doc0000.txt").write_text("an edited document that is new", encoding="utf-8")
    second = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    assert first.train[0][0] != second.train[0][0]


def test_prepared_folders_pass_through_with_their_validation_split(tmp_path):
    write_text_files(tmp_path / "corpus", make_documents(40))
    tokenizer_config = data_config(tmp_path, tmp_path / "corpus")
    tokenizer_dir = prepare_run_data(tokenizer_config, is_main_process=True, barrier=no_barrier).tokenizer_dir
    preprocess([str(tmp_path / "corpus")], tokenizer_dir, tmp_path / "made", val_fraction=0.3)
    config = data_config(tmp_path, tmp_path / "made")
    config.cache_dir = str(tmp_path / "empty_cache")
    prepared = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    assert prepared.train == [(tmp_path / "made" / "train", 1.0)]
    assert prepared.validation == {"validation": tmp_path / "made" / "validation"}
    assert prepared.tokenizer_dir == tmp_path / "made" / "train" / "tokenizer"
    assert not (tmp_path / "empty_cache").exists()
    # Explicit validation sets replace the held-out part; a raw one is tokenised with the same tokenizer.
    held = make_documents(4, seed=7)
    write_text_files(tmp_path / "held", held)
    config.validation = [ValidationSetConfig(name="held", source=str(tmp_path / "held")),
                         ValidationSetConfig(name="shard", source=str(tmp_path / "made" / "validation"))]
    prepared = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    assert set(prepared.validation) == {"held", "shard"}
    held_tokens = np.asarray(read_shard(prepared.validation["held"]).tokens)
    np.testing.assert_array_equal(held_tokens, reference_tokens(load_tokenizer(prepared.tokenizer_dir), held))


def test_mixture_weights_are_passed_on(tmp_path):
    write_text_files(tmp_path / "a", make_documents(20, seed=1))
    write_text_files(tmp_path / "b", make_documents(20, seed=2))
    config = data_config(tmp_path, tmp_path / "a", tmp_path / "b")
    config.train[1].weight = 0.25
    prepared = prepare_run_data(config, is_main_process=True, barrier=no_barrier)
    assert [weight for _, weight in prepared.train] == [1.0, 0.25]
    assert PackedDataset(prepared.train, seq_len=16, seed=0).vocab_size == prepared.vocab_size


def test_tokenizer_mismatch_between_shards_and_configured_tokenizer(tmp_path):
    write_text_files(tmp_path / "corpus", make_documents(40))
    prepared = prepare_run_data(data_config(tmp_path, tmp_path / "corpus"), is_main_process=True, barrier=no_barrier)
    other = data_config(tmp_path, prepared.train[0][0], tokenizer=TokenizerConfig(vocab_size=350))
    other_tokenizer = prepare_run_data(data_config(tmp_path / "x", tmp_path / "corpus", tokenizer=TokenizerConfig(vocab_size=350)),
                                       is_main_process=True, barrier=no_barrier).tokenizer_dir
    other.tokenizer.path = str(other_tokenizer)
    with pytest.raises(DataError, match="was tokenised with tokenizer"):
        prepare_run_data(other, is_main_process=True, barrier=no_barrier)


def test_other_ranks_wait_for_the_main_process_and_read_its_cache(tmp_path):
    write_text_files(tmp_path / "corpus", make_documents(30))
    config = data_config(tmp_path, tmp_path / "corpus")
    barrier = threading.Barrier(2, timeout=120)
    results = {}

    def rank(is_main):
        results[is_main] = prepare_run_data(config, is_main_process=is_main, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(flag,)) for flag in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[True] == results[False]


def test_failure_on_the_main_process_still_releases_the_others(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    config = data_config(tmp_path, tmp_path / "empty.txt")
    calls = []
    with pytest.raises(DataError, match="yielded no"):
        prepare_run_data(config, is_main_process=True, barrier=lambda: calls.append("main"))
    with pytest.raises(DataError, match="main process should have prepared it"):
        prepare_run_data(config, is_main_process=False, barrier=lambda: calls.append("other"))
    assert calls == ["main", "other"]
    assert not list((tmp_path / "cache").rglob("manifest.json"))


def test_builtin_pydoc_uses_its_fixed_held_out_part(tmp_path, monkeypatch):
    from polycom_lm.data import pydoc_corpus

    # A small stand-in for the harvested corpus keeps this test fast; the split logic is the real one.
    documents = {"train": make_documents(40, seed=3), "validation": make_documents(5, seed=4)}
    monkeypatch.setattr(pydoc_corpus, "iter_documents", lambda split: iter(documents[split]))
    prepared = prepare_run_data(data_config(tmp_path, "builtin:pydoc"), is_main_process=True, barrier=no_barrier)
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    np.testing.assert_array_equal(np.asarray(read_shard(prepared.validation["validation"]).tokens),
                                  reference_tokens(tokenizer, documents["validation"]))


def test_two_concurrent_runs_build_each_cache_entry_once(tmp_path, monkeypatch):
    write_text_files(tmp_path / "corpus", make_documents(30))
    config = data_config(tmp_path, tmp_path / "corpus")
    calls = []
    real_preprocess, real_train = prepare_module.preprocess, prepare_module.train_sentencepiece

    def counting(real, name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(prepare_module, "preprocess", counting(real_preprocess, "preprocess"))
    monkeypatch.setattr(prepare_module, "train_sentencepiece", counting(real_train, "tokenizer"))
    results = []
    # flock locks belong to open file descriptions, so two threads exclude each other like two processes.
    threads = [threading.Thread(target=lambda: results.append(prepare_run_data(config, is_main_process=True,
                                                                               barrier=no_barrier))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert sorted(calls) == ["preprocess", "tokenizer"]
