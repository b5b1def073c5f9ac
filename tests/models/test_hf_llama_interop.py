"""Conversion to and from transformers' LlamaForCausalLM: with converted weights the logits match to 1e-5
in fp32, both directions, for multi-head and grouped-query attention, tied and untied embeddings. This is
the test that our RoPE, attention, norms and SwiGLU layout are right."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from polycom_lm.config import ModelConfig  # noqa: E402
from polycom_lm.errors import ConfigError  # noqa: E402
from polycom_lm.models import build_model  # noqa: E402
from polycom_lm.models.hf_interop import from_hf_llama, to_hf_llama  # noqa: E402


def random_llama(n_kv_heads: int, tie: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random gains and larger weights than the default init, so a swapped or missing tensor shows.
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.08)
    return model


@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (2, False), (1, True)])
def test_from_hf_llama_matches_transformers_logits(n_kv_heads, tie):
    hf_model = random_llama(n_kv_heads, tie)
    model = from_hf_llama(hf_model).eval()
    assert model.config.n_kv_heads == n_kv_heads and model.config.tie_embeddings == tie
    assert model.config.rope_theta == 500.0 and model.config.norm_eps == 1e-6
    input_ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        ours = model(input_ids)
    assert expected.abs().max() > 1.0  # not trivially small
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (2, True)])
def test_to_hf_llama_matches_our_logits(n_kv_heads, tie):
    config = ModelConfig(
        vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden_size=96,
        activation="swiglu", max_seq_len=64, rope_theta=2000.0, tie_embeddings=tie, init_std=0.08,
    )
    torch.manual_seed(1)
    model = build_model(config, device="cpu").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.3)
    hf_model = to_hf_llama(model)
    assert hf_model.config.tie_word_embeddings == tie
    if tie:
        assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    input_ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids).logits, model(input_ids), rtol=0, atol=1e-5)
    back = from_hf_llama(hf_model)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_only_dense_swiglu_without_qk_norm_converts():
    polynorm = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, activation="polynorm",
                                       ffn_hidden_size=32, max_seq_len=8), device="cpu")
    with pytest.raises(ConfigError, match="only dense swiglu"):
        to_hf_llama(polynorm)
    normed = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, qk_norm=True,
                                     ffn_hidden_size=32, max_seq_len=8), device="cpu")
    with pytest.raises(ConfigError, match="qk_norm"):
        to_hf_llama(normed)


def test_scaled_rope_is_refused():
    hf_config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="RoPE"):
        from_hf_llama(LlamaForCausalLM(hf_config))
