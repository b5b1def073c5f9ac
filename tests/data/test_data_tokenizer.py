"""Tokenizers: trained SentencePiece models round-trip text; SentencePiece and Hugging Face folders load
behind one interface; vocab checks."""

from __future__ import annotations

import json

import pytest
from data_helpers import make_documents, tiny_tokenizer  # noqa: F401 (fixture)

from polycom_lm.data import check_vocab, load_tokenizer, train_sentencepiece
from polycom_lm.errors import DataError


def test_trained_sentencepiece_round_trips_text_with_newlines_and_unseen_characters(tiny_tokenizer):
    text = "The cat sat.\n\n  Two spaces, a tab\tand ünïcödé 中文 ✓\n"
    ids = tiny_tokenizer.encode_batch([text])[0]
    assert tiny_tokenizer.decode(ids) == text
    assert max(ids) < tiny_tokenizer.vocab_size
    assert tiny_tokenizer.vocab_size == 400
    assert (tiny_tokenizer.eos_id, tiny_tokenizer.bos_id, tiny_tokenizer.pad_id) == (2, 1, 3)


def test_encode_batch_appends_eos_when_asked(tiny_tokenizer):
    plain, with_eos = tiny_tokenizer.encode_batch(["the dog"]), tiny_tokenizer.encode_batch(["the dog"], add_eos=True)
    assert with_eos[0] == plain[0] + [tiny_tokenizer.eos_id]


def test_special_tokens_stay_whole(tiny_tokenizer):
    ids = tiny_tokenizer.encode_batch(["a<|sep|>b"])[0]
    special = tiny_tokenizer.processor.piece_to_id("<|sep|>")
    assert special in ids and tiny_tokenizer.decode(ids) == "a<|sep|>b"


def test_unigram_without_byte_fallback_trains_and_loads(tmp_path):
    tokenizer = train_sentencepiece(make_documents(200), tmp_path, vocab_size=120, model_type="unigram",
                                    byte_fallback=False)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.identity == tokenizer.identity
    assert reloaded.decode(reloaded.encode_batch(["the cat sat"])[0]) == "the cat sat"


def test_training_is_deterministic(tmp_path):
    first = train_sentencepiece(make_documents(120), tmp_path / "a", vocab_size=360)
    second = train_sentencepiece(make_documents(120), tmp_path / "b", vocab_size=360)
    assert first.identity == second.identity


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_sentencepiece(make_documents(10), tmp_path, vocab_size=100, byte_fallback=True)


def _write_hf_tokenizer(folder, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<unk>": 0, "<s>": 1, eos: 2, "<pad>": 3}
    for word in "the cat sat on a mat".split():
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return vocab


def test_hugging_face_folder_loads_behind_the_same_interface(tmp_path):
    vocab = _write_hf_tokenizer(tmp_path / "hf")
    tokenizer = load_tokenizer(tmp_path / "hf")
    assert tokenizer.kind == "huggingface"
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id) == (2, 1, 3)
    assert tokenizer.vocab_size == len(vocab)
    ids = tokenizer.encode_batch(["the cat sat", "a mat"], add_eos=True)
    assert ids == [[vocab["the"], vocab["cat"], vocab["sat"], 2], [vocab["a"], vocab["mat"], 2]]
    assert tokenizer.decode(ids[0][:-1]) == "the cat sat"


def test_hugging_face_eos_comes_from_tokenizer_config(tmp_path):
    _write_hf_tokenizer(tmp_path / "hf", eos="<|finished|>")
    with pytest.raises(DataError, match="cannot find the EOS token"):
        load_tokenizer(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|finished|>"}))
    assert load_tokenizer(tmp_path / "hf").eos_id == 2


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_check_vocab_rejects_a_model_smaller_than_the_data():
    check_vocab(400, 400, "run")
    check_vocab(400, 512, "run")
    with pytest.raises(DataError, match=r"shards/x: the data's tokenizer has 400 tokens but the model's vocab_size is 300"):
        check_vocab(400, 300, "shards/x")
