"""Our MoE model against transformers' OlmoeForCausalLM with the same weights (tiny random configs)."""

from __future__ import annotations

import pytest
import torch

from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models import build_model
from polycom_lm.models.hf_olmoe import from_hf_olmoe, hf_olmoe_config, to_hf_olmoe


def tiny_hf_olmoe(norm_topk_prob: bool = False, tie: bool = False, kv_heads: int = 4):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
        max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and a random (non-zero) router, which HF initialises to 0
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                parameter.uniform_(0.5, 1.5)
            elif "mlp.gate" in name:
                parameter.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("norm_topk_prob, tie, kv_heads", [(False, False, 4), (True, True, 2)])
def test_from_hf_olmoe_logits_match(norm_topk_prob, tie, kv_heads):
    hf_model = tiny_hf_olmoe(norm_topk_prob, tie, kv_heads)
    model = from_hf_olmoe(hf_model)
    assert model.config.qk_norm_scope == "full" and model.config.family == "moe"
    input_ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        logits = model(input_ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_olmoe_round_trip_is_exact_and_head_scope_would_differ():
    config = ModelConfig(
        family="moe", vocab_size=96, d_model=32, n_layers=2, n_heads=4, qk_norm=True, qk_norm_scope="full",
        max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16),
    )
    torch.manual_seed(1)
    model = build_model(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
    hf_model = to_hf_olmoe(model)
    back = from_hf_olmoe(hf_model)
    for (name, ours), theirs in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(ours, theirs), name
    input_ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids), hf_model(input_ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="qk_norm_scope: full"):
        hf_olmoe_config(ModelConfig(family="moe", qk_norm=True, qk_norm_scope="head"))


def test_from_hf_olmoe_refuses_clip_qkv():
    hf_model = tiny_hf_olmoe()
    hf_model.config.clip_qkv = 8.0
    with pytest.raises(ConfigError, match="clip_qkv"):
        from_hf_olmoe(hf_model)
