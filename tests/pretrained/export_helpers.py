"""Helpers of the export and generation tests: a small SentencePiece tokenizer and tiny models whose
weights are far from their init."""

from __future__ import annotations

import torch

from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.data.tokenizer import train_sentencepiece
from polycom_lm.models import build_model


def small_tokenizer(folder):
    text = ["the quick brown fox jumps over the lazy dog", "a model of polynomial activations", "12 + 30 = 42"] * 30
    return train_sentencepiece(text, folder, vocab_size=300)


def trained_looking_model(family: str, activation: str, **overrides):
    """A tiny model with weights far from init (coefficients, norm gains, a wide init), so that a
    mismatched formula or layout shows in the logits."""
    config = ModelConfig(
        family=family, vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=32,
        activation=activation, max_seq_len=64, init_std=0.15, qk_norm=family == "moe",
        qk_norm_scope="full", moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16), **overrides)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "activation" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model
