"""Preprocessing writes exactly the reference token stream, identically for any worker count, splits
held-out documents disjointly, and never leaves a folder that looks finished when interrupted."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import SHARED_DATA, make_documents, reference_tokens, tiny_tokenizer, write_text_files  # noqa: F401

from polycom_lm.data import read_shard
from polycom_lm.data.preprocess import preprocess
from polycom_lm.data import shards as shard_format
from polycom_lm.data.preprocess import held_out
from polycom_lm.data.sources import SourceOptions
from polycom_lm.errors import DataError


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shard_holds_each_document_followed_by_eos(tmp_path, tiny_tokenizer):
    documents = make_documents(40)
    write_text_files(tmp_path / "corpus", documents)
    outputs = preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out", chunk_chars=500)
    shard = read_shard(outputs["train"])
    expected = reference_tokens(tiny_tokenizer, documents)
    assert shard.tokens.dtype == np.uint16 and shard.num_documents == 40
    np.testing.assert_array_equal(np.asarray(shard.tokens), expected)
    ends = np.cumsum([len(tiny_tokenizer.encode_batch([d])[0]) + 1 for d in documents])
    np.testing.assert_array_equal(np.asarray(shard.offsets), np.concatenate([[0], ends]))
    assert shard.manifest["tokenizer"]["identity"] == tiny_tokenizer.identity
    assert (shard.tokenizer_dir / "tokenizer.model").is_file()
    assert "validation" not in outputs


def test_output_is_byte_identical_for_one_and_two_workers(tmp_path, tiny_tokenizer):
    write_text_files(tmp_path / "corpus", make_documents(60))
    kwargs = dict(val_fraction=0.2, chunk_chars=300)
    preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "one", workers=1, **kwargs)
    preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "two", workers=2, **kwargs)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_held_out_documents_are_a_disjoint_hash_chosen_part(tmp_path, tiny_tokenizer):
    documents = make_documents(80)
    write_text_files(tmp_path / "corpus", documents)
    outputs = preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out", val_fraction=0.25)
    chosen = [held_out(d, 0.25) for d in documents]
    assert 5 < sum(chosen) < 40
    train, validation = read_shard(outputs["train"]), read_shard(outputs["validation"])
    expected_train = reference_tokens(tiny_tokenizer, [d for d, c in zip(documents, chosen) if not c])
    expected_validation = reference_tokens(tiny_tokenizer, [d for d, c in zip(documents, chosen) if c])
    np.testing.assert_array_equal(np.asarray(train.tokens), expected_train)
    np.testing.assert_array_equal(np.asarray(validation.tokens), expected_validation)
    assert validation.manifest["split"] == "validation"


def test_validation_sources_go_to_the_validation_shard(tmp_path, tiny_tokenizer):
    write_text_files(tmp_path / "train", make_documents(10, seed=1))
    held = make_documents(3, seed=2)
    write_text_files(tmp_path / "held", held)
    outputs = preprocess([str(tmp_path / "train")], tiny_tokenizer.directory, tmp_path / "out",
                         val_sources=[str(tmp_path / "held")])
    np.testing.assert_array_equal(np.asarray(read_shard(outputs["validation"]).tokens), reference_tokens(tiny_tokenizer, held))


def test_large_vocab_uses_uint32():
    assert shard_format.token_dtype(65536) == np.uint16
    assert shard_format.token_dtype(65537) == np.uint32


def test_uint32_shard_round_trips(tmp_path):
    writer = shard_format.ShardWriter(tmp_path / "s", vocab_size=100_000, eos_id=0, tokenizer={"identity": "x"}, source="test")
    writer.write(np.array([70_000, 5, 0, 99_999, 0], dtype=np.uint32), np.array([3, 2]))
    writer.finish()
    shard = read_shard(tmp_path / "s")
    assert shard.tokens.dtype == np.uint32 and shard.tokens.tolist() == [70_000, 5, 0, 99_999, 0]


def test_interrupted_run_leaves_nothing_behind(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    write_text_files(corpus, make_documents(30))
    (corpus / "doc0020.txt").write_bytes(b"ok until \xff here")  # reading fails two-thirds of the way in
    with pytest.raises(DataError, match=r"doc0020.txt: not UTF-8 at byte offset 9"):
        preprocess([str(corpus)], tiny_tokenizer.directory, tmp_path / "out", chunk_chars=200, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_existing_output_is_never_overwritten(tmp_path, tiny_tokenizer):
    write_text_files(tmp_path / "corpus", make_documents(3))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists"):
        preprocess([str(tmp_path / "corpus")], tiny_tokenizer.directory, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "precious"


def test_reader_keeps_memory_flat_by_chunking():
    from polycom_lm.data.preprocess import chunk_documents

    produced = []

    def documents():
        for index in range(10_000):
            produced.append(index)
            yield "x" * 100

    chunks = chunk_documents(documents(), chunk_chars=1000)
    next(chunks)
    assert len(produced) == 10  # nothing is read ahead of the chunk being built


@pytest.mark.skipif(not (SHARED_DATA / "pretrain" / "tinystories").is_dir(), reason="shared data absent")
def test_shared_tinystories_preprocesses(tmp_path, tiny_tokenizer):
    path = SHARED_DATA / "pretrain" / "tinystories" / "tinystories_v1_valid_head.txt"
    outputs = preprocess([str(path)], tiny_tokenizer.directory, tmp_path / "out", val_fraction=0.05,
                         options=SourceOptions(document_delimiter="blank_lines"))
    train = read_shard(outputs["train"])
    assert train.num_tokens > 100_000 and train.manifest["max_token_id"] < tiny_tokenizer.vocab_size


def test_hugging_face_tokenizer_folder_preprocesses_and_travels_with_the_shard(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from polycom_lm.data import load_tokenizer

    vocab = {"<unk>": 0, "</s>": 1, **{word: index + 2 for index, word in enumerate("the cat sat on a mat".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "hf").mkdir()
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "corpus.jsonl").write_text('{"text": "the cat sat"}\n{"text": "on a mat dog"}\n', encoding="utf-8")
    shard = read_shard(preprocess([str(tmp_path / "corpus.jsonl")], tmp_path / "hf", tmp_path / "out", workers=2)["train"])
    assert shard.tokens.tolist() == [2, 3, 4, 1, 5, 6, 7, 0, 1]
    assert load_tokenizer(shard.tokenizer_dir).identity == shard.tokenizer_identity


@pytest.mark.parametrize("workers", [1, 2])
def test_a_token_budget_keeps_each_sources_first_tokens_exactly(tmp_path, tiny_tokenizer, workers):
    first, second = make_documents(50, seed=1), make_documents(50, seed=2)
    write_text_files(tmp_path / "a", first)
    write_text_files(tmp_path / "b", second)
    outputs = preprocess([str(tmp_path / "a"), str(tmp_path / "b")], tiny_tokenizer.directory, tmp_path / "out",
                         max_tokens=777, workers=workers, chunk_chars=300)
    shard = read_shard(outputs["train"])
    expected = reference_tokens(tiny_tokenizer, first)[:777] + reference_tokens(tiny_tokenizer, second)[:777]
    np.testing.assert_array_equal(np.asarray(shard.tokens), expected)  # each source cut at its own budget
    assert shard.offsets[-1] == 1554 and shard.manifest["settings"]["max_tokens"] == 777
    with pytest.raises(DataError, match="max_tokens must be positive"):
        preprocess([str(tmp_path / "a")], tiny_tokenizer.directory, tmp_path / "bad", max_tokens=0)


def test_the_progress_bar_shows_tokens_per_second_and_an_eta(tmp_path, tiny_tokenizer, capsys):
    from polycom_lm.cli import main
    from polycom_lm.commands.preprocess import ProgressBar

    estimate = ProgressBar(budget=None, total_bytes=1000)
    estimate(100, 3, 250)  # a quarter of the bytes gave 100 tokens: about 400 in all
    assert (estimate.bar.n, estimate.bar.total) == (100, 400)
    estimate.close()
    budgeted = ProgressBar(budget=5000, total_bytes=10**9)
    budgeted(100, 3, 250)
    assert budgeted.bar.total == 5000
    budgeted.close()
    write_text_files(tmp_path / "corpus", make_documents(30))
    assert main(["preprocess", "--source", str(tmp_path / "corpus"), "--tokenizer", str(tiny_tokenizer.directory),
                 "--out", str(tmp_path / "out"), "--max-tokens", "500"]) == 0
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "500/500" in bar and "tok/s" in bar and "<00:00" in bar  # done, rate, remaining time
