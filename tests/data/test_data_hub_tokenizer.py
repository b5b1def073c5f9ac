"""`data.tokenizer.path` as a Hugging Face hub id, resolved through a pre-populated local cache folder
(HF_HUB_CACHE / HF_HOME in tmp_path, built here with `tokenizers`; no network): the run tokenises with it,
a missing one is a one-line error naming the id and the cache, and local folders still win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_helpers import make_documents, write_text_files
from polycom_lm.cli import main
from polycom_lm.config import config_from_dict
from polycom_lm.data import prepare_run_data, read_shard
from polycom_lm.data.hub import is_hub_id, resolve_tokenizer_path
from polycom_lm.errors import DataError

REPO_ID = "EleutherAI/gpt-neox-20b"
COMMIT = "c292233c833e336628618a88a648727eb3dff0a7"


def build_tokenizer_json(path: Path) -> None:
    """A small byte-level BPE tokenizer with GPT-NeoX's special token, trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(make_documents(100, seed=3), trainer)
    tokenizer.save(str(path))


def populate_hub_cache(cache: Path, repo_id: str = REPO_ID) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repository = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repository / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)
    build_tokenizer_json(snapshot / "tokenizer.json")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_trains_a_run_with_that_tokenizer(tmp_path, hub_cache):
    snapshot = populate_hub_cache(hub_cache)
    corpus = tmp_path / "corpus"
    write_text_files(corpus, make_documents(30))
    config = config_from_dict({"data": {"train": [{"source": str(corpus)}], "tokenizer": {"path": REPO_ID},
                                        "cache_dir": str(tmp_path / "cache"), "preprocess_workers": 1}})
    prepared = prepare_run_data(config.data, is_main_process=True, barrier=lambda: None)
    assert prepared.tokenizer_dir == snapshot
    shard = read_shard(prepared.train[0][0])
    assert shard.manifest["tokenizer"]["kind"] == "huggingface"
    assert prepared.eos_id == shard.manifest["eos_id"] == json.loads((snapshot / "tokenizer.json").read_text())[
        "added_tokens"][0]["id"]
    # Every rank resolves the same way (the others read what the main process found).
    assert prepare_run_data(config.data, is_main_process=False, barrier=lambda: None).train == prepared.train


def test_hf_hub_cache_variable_wins_over_hf_home(tmp_path, hub_cache, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    snapshot = populate_hub_cache(elsewhere)
    monkeypatch.setenv("HF_HUB_CACHE", str(elsewhere))
    assert resolve_tokenizer_path(REPO_ID) == snapshot


def test_a_missing_hub_id_offline_is_one_line_naming_id_cache_and_fix(tmp_path, hub_cache):
    with pytest.raises(DataError) as raised:
        resolve_tokenizer_path("meta-llama/Llama-2-7b-hf")
    message = str(raised.value)
    assert "\n" not in message and "'meta-llama/Llama-2-7b-hf'" in message and str(hub_cache) in message
    assert "HF_HUB_OFFLINE" in message and "hf download meta-llama/Llama-2-7b-hf" in message


def test_cli_error_for_a_missing_tokenizer_says_which_key(tmp_path, hub_cache, capsys):
    corpus = tmp_path / "corpus"
    write_text_files(corpus, make_documents(5))
    assert main(["preprocess", "--source", str(corpus), "--tokenizer", "EleutherAI/pythia-70m",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: tokenizer 'EleutherAI/pythia-70m' is not a local folder") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_preprocess_accepts_a_cached_hub_id(tmp_path, hub_cache, capsys):
    populate_hub_cache(hub_cache)
    corpus = tmp_path / "corpus"
    write_text_files(corpus, make_documents(10))
    assert main(["preprocess", "--source", str(corpus), "--tokenizer", REPO_ID, "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert read_shard(tmp_path / "out" / "train").manifest["tokenizer"]["kind"] == "huggingface"


def test_local_paths_are_never_taken_for_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EleutherAI" / "gpt-neox-20b").mkdir(parents=True)
    assert not is_hub_id("EleutherAI/gpt-neox-20b")  # a folder of that name exists here
    assert resolve_tokenizer_path("EleutherAI/gpt-neox-20b") == Path("EleutherAI/gpt-neox-20b")
    for spec in ("/abs/path", "./relative", "~/tok", "a/b/c", "tokenizer folder"):
        assert not is_hub_id(spec)
    assert is_hub_id("gpt2") and is_hub_id("meta-llama/Llama-2-7b-hf")
