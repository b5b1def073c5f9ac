"""What the transformers conversions (`hf_interop` for Llama, `hf_olmoe` for OLMoE) share: reading the
decoder fields of a transformers config, and copying a converted state dict in exactly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polycom_lm.errors import ConfigError


def rope_theta(hf_config: Any, family: str) -> float:
    """The RoPE base of a transformers config; scaled RoPE variants have no counterpart here."""
    parameters = getattr(hf_config, "rope_parameters", None)  # transformers ≥ 5
    if isinstance(parameters, dict):
        rope_type = parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{family} config uses rope_type {rope_type!r}; only 'default' RoPE converts")
        return float(parameters["rope_theta"])
    scaling = getattr(hf_config, "rope_scaling", None)  # transformers 4.x
    if scaling:
        raise ConfigError(f"{family} config uses rope_scaling {scaling!r}; only unscaled RoPE converts")
    return float(hf_config.rope_theta)


def decoder_config_fields(hf_config: Any, family: str) -> dict[str, Any]:
    """`ModelConfig` fields shared by Llama-like transformers configs (SwiGLU, RMSNorm, RoPE)."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{family} config hidden_act {hf_config.hidden_act!r}: only 'silu' (SwiGLU) converts")
    n_heads = hf_config.num_attention_heads
    return dict(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads,
        activation="swiglu",
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=rope_theta(hf_config, family),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str, tied: bool) -> None:
    """Copy `state` into `module`, failing on any missing, unexpected or misshaped key (a tied head counts
    as present)."""
    expected = set(module.state_dict())
    tied_heads = {"lm_head.weight", "output.weight"} if tied else set()
    missing = sorted(expected - set(state) - tied_heads)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(f"{what}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    with torch.no_grad():
        own = module.state_dict(keep_vars=True)
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise ConfigError(f"{what}: {key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}")
            own[key].copy_(tensor)
