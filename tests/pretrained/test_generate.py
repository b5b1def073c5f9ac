"""Generation with the KV cache: greedy output equals transformers' `generate` on the exported model;
sampling is reproducible and top-k 1 is greedy; the command prints the continuation."""

from __future__ import annotations

import pytest
import torch

from export_helpers import small_tokenizer, trained_looking_model
from polycom_lm.errors import ConfigError
from polycom_lm.models.generation import generate_tokens
from polycom_lm.pretrained.export import export_model
from polycom_lm.pretrained.loading import LoadedModel, load_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("family, activation", [("dense", "polynorm"), ("dense", "swiglu"), ("moe", "polyrelu")])
def test_greedy_generation_equals_transformers_generate(tokenizer, tmp_path, family, activation):
    from transformers import AutoModelForCausalLM

    model = trained_looking_model(family, activation)
    export_model(LoadedModel(model, model.config, tokenizer, tmp_path, "run"), tmp_path / "out")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    prompt = tokenizer.encode_batch(["the quick brown fox"])[0]
    ours = list(generate_tokens(model, prompt, 30, eos_id=None))
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, min_new_tokens=30)[0, len(prompt):].tolist()
    assert ours == theirs
    # Negative control: without the cache's positions a continuation differs (every step from position 0).
    with torch.no_grad():
        restarted = [int(model(torch.tensor([[token]]))[0, -1].argmax()) for token in ours[:10]]
    assert restarted != ours[1:11]


def test_sampling_is_reproducible_and_top_k_one_is_greedy(tokenizer):
    model = trained_looking_model("dense", "polynorm")
    prompt = tokenizer.encode_batch(["a model"])[0]

    def sample(seed, **options):
        return list(generate_tokens(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **options))

    assert sample(3) == sample(3) and sample(3) != sample(4)
    assert sample(5, top_k=1) == list(generate_tokens(model, prompt, 20))
    assert sample(5, top_p=1e-6) == list(generate_tokens(model, prompt, 20))
    with pytest.raises(ConfigError, match="--top-p must be in"):
        sample(0, top_p=0.0)


def test_generation_stops_at_eos_and_at_max_seq_len(tokenizer):
    model = trained_looking_model("dense", "gelu")
    prompt = tokenizer.encode_batch(["the lazy dog"])[0]
    greedy = list(generate_tokens(model, prompt, 10))
    assert list(generate_tokens(model, prompt, 10, eos_id=greedy[3])) == greedy[:4]
    long = list(generate_tokens(model, prompt, 1000))
    assert len(prompt) + len(long) == model.config.max_seq_len


def test_generate_command_prints_the_greedy_continuation(tokenizer, tmp_path):
    from trainer_test_helpers import run_cli

    model = trained_looking_model("dense", "polynorm")
    export_model(LoadedModel(model, model.config, tokenizer, tmp_path, "run"), tmp_path / "out")
    loaded = load_model(tmp_path / "out")
    prompt = tokenizer.encode_batch(["the quick"])[0]
    tokens = list(generate_tokens(loaded.model, prompt, 12, eos_id=tokenizer.eos_id))
    tokens = tokens[: tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens
    expected = tokenizer.decode(prompt + tokens)
    process = run_cli("generate", str(tmp_path / "out"), "--prompt", "the quick", "--max-new-tokens", "12", "--device", "cpu")
    assert process.stdout.rstrip("\n") == expected
