"""What the transformers conversions (`hf_interop` for Llama, `hf_olmoe` for OLMoE, `hf_polycom` for our
own exported architecture) share: the decoder's key names, reading the decoder fields of a transformers
config, and copying a converted state dict in exactly.

All three use transformers' Llama layout for everything but the FFN: `model.embed_tokens`, per layer
`self_attn.{q,k,v,o}_proj` (+ `q_norm` / `k_norm`), `input_layernorm`, `post_attention_layernorm`, then
`model.norm` and `lm_head` (left out when tied to the embedding). Each conversion adds its FFN keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polycom_lm.errors import ConfigError


# (our key, transformers key) outside the layers; the LM head is handled by `rename_to_hf` / `rename_from_hf`.
GLOBAL_KEYS = (("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"))
# (our suffix, transformers suffix) inside layer i (`layers.{i}.` / `model.layers.{i}.`).
ATTENTION_KEYS = (
    ("attention.q_proj.weight", "self_attn.q_proj.weight"),
    ("attention.k_proj.weight", "self_attn.k_proj.weight"),
    ("attention.v_proj.weight", "self_attn.v_proj.weight"),
    ("attention.o_proj.weight", "self_attn.o_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
QK_NORM_KEYS = (
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
)
HEAD_KEY = ("output.weight", "lm_head.weight")


def rename_to_hf(
    state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool, layer_keys: tuple[tuple[str, str], ...]
) -> dict[str, torch.Tensor]:
    """Our keys → transformers keys, for the global keys, the LM head (unless tied) and `layer_keys` of every
    layer. Tensors are not copied."""
    hf_state = {hf: state[ours] for ours, hf in GLOBAL_KEYS}
    if not tie_embeddings:
        hf_state[HEAD_KEY[1]] = state[HEAD_KEY[0]]
    for index in range(n_layers):
        for ours, hf in layer_keys:
            hf_state[f"model.layers.{index}.{hf}"] = state[f"layers.{index}.{ours}"]
    return hf_state


def rename_from_hf(
    hf_state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool, layer_keys: tuple[tuple[str, str], ...]
) -> dict[str, torch.Tensor]:
    """The inverse of `rename_to_hf` (a tied checkpoint's `lm_head.weight`, if present, is ignored)."""
    state = {ours: hf_state[hf] for ours, hf in GLOBAL_KEYS}
    if not tie_embeddings:
        state[HEAD_KEY[0]] = hf_state[HEAD_KEY[1]]
    for index in range(n_layers):
        for ours, hf in layer_keys:
            state[f"layers.{index}.{ours}"] = hf_state[f"model.layers.{index}.{hf}"]
    return state


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
