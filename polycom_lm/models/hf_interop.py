"""Conversion between our dense `Transformer` and transformers' `LlamaForCausalLM` (SwiGLU, no biases).

Both use the "rotate half" RoPE layout, so q/k rows need no permutation; the only reshaping is the FFN:
Llama's `gate_proj` and `up_proj` are stacked into our `in_proj` as `[gate | up]`, and `down_proj` is our
`out_proj`. Round trips are exact (weights are copied, not recomputed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.attention import attention_shape
from polycom_lm.models.dense import Transformer
from polycom_lm.models.hf_common import ATTENTION_KEYS, decoder_config_fields, load_exactly, rename_from_hf, rename_to_hf
from polycom_lm.models.hf_olmoe import from_hf_olmoe  # noqa: F401  (re-exported; OLMoE conversion lives there)


def model_config_from_hf_llama(hf_config: Any) -> ModelConfig:
    """Our `ModelConfig` (activation swiglu) for a transformers `LlamaConfig`."""
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ConfigError(f"Llama config has {flag}=True; our model has no biases")
    return ModelConfig(family="dense", ffn_hidden_size=hf_config.intermediate_size,
                       **decoder_config_fields(hf_config, "Llama"))


def hf_llama_config(model_config: ModelConfig) -> Any:
    """A transformers `LlamaConfig` equivalent to `model_config` (which must be dense SwiGLU, no QK-norm)."""
    from transformers import LlamaConfig

    if model_config.family != "dense" or model_config.activation != "swiglu":
        raise ConfigError(
            f"only dense swiglu models convert to Llama, got family {model_config.family!r} "
            f"activation {model_config.activation!r}"
        )
    if model_config.qk_norm:
        raise ConfigError("model.qk_norm is set; Llama has no QK-norm")
    if model_config.ffn_width is not None and model_config.ffn_width != model_config.ffn_hidden_size:
        raise ConfigError("model.ffn_width differs from model.ffn_hidden_size; set ffn_width to null to convert")
    n_heads, n_kv_heads, head_dim = attention_shape(model_config)
    return LlamaConfig(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.d_model,
        intermediate_size=model_config.ffn_hidden_size,
        num_hidden_layers=model_config.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=model_config.max_seq_len,
        rms_norm_eps=model_config.norm_eps,
        rope_theta=model_config.rope_theta,
        tie_word_embeddings=model_config.tie_embeddings,
        initializer_range=model_config.init_std,
        attention_bias=False,
        mlp_bias=False,
    )


# Llama's FFN is `gate_proj`, `up_proj` (stacked into our `in_proj` as [gate | up]) and `down_proj`; the
# out-projection is a plain rename, the in-projection a split / concatenation.
_LLAMA_LAYER_KEYS = ATTENTION_KEYS + (("ffn.out_proj.weight", "mlp.down_proj.weight"),)


def hf_llama_state_dict_to_ours(hf_state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Rename (and stack gate/up of) a `LlamaForCausalLM` state dict into our `Transformer`'s keys."""
    ours = rename_from_hf(hf_state, n_layers, tie_embeddings, _LLAMA_LAYER_KEYS)
    for index in range(n_layers):
        hf = f"model.layers.{index}.mlp."
        ours[f"layers.{index}.ffn.in_proj.weight"] = torch.cat(
            [hf_state[f"{hf}gate_proj.weight"], hf_state[f"{hf}up_proj.weight"]], dim=0
        )
    return ours


def our_state_dict_to_hf_llama(state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The inverse of `hf_llama_state_dict_to_ours` (no `lm_head.weight` when the embeddings are tied)."""
    hf_state = rename_to_hf(state, n_layers, tie_embeddings, _LLAMA_LAYER_KEYS)
    for index in range(n_layers):
        gate, up = state[f"layers.{index}.ffn.in_proj.weight"].chunk(2, dim=0)
        hf_state[f"model.layers.{index}.mlp.gate_proj.weight"] = gate
        hf_state[f"model.layers.{index}.mlp.up_proj.weight"] = up
    return hf_state


def from_hf_llama(hf_model: nn.Module) -> Transformer:
    """Our `Transformer` with the weights of a transformers `LlamaForCausalLM` (same device and dtype)."""
    model_config = model_config_from_hf_llama(hf_model.config)
    reference = next(hf_model.parameters())
    with torch.device("meta"):
        model = Transformer(model_config)
    model.to_empty(device=reference.device)
    model.init_weights()
    hf_state = hf_model.state_dict()
    load_exactly(
        model,
        hf_llama_state_dict_to_ours(hf_state, model_config.n_layers, model_config.tie_embeddings),
        "converting LlamaForCausalLM",
        tied=model_config.tie_embeddings,
    )
    return model.to(reference.dtype)


def to_hf_llama(model: Transformer) -> nn.Module:
    """A transformers `LlamaForCausalLM` with `model`'s weights (same device and dtype), in eval mode."""
    from transformers import LlamaForCausalLM

    config = model.config
    reference = next(model.parameters())
    hf_config = hf_llama_config(config)
    hf_model = LlamaForCausalLM(hf_config).to(device=reference.device, dtype=reference.dtype)
    state = our_state_dict_to_hf_llama(model.state_dict(), config.n_layers, config.tie_embeddings)
    load_exactly(hf_model, state, "converting to LlamaForCausalLM", tied=config.tie_embeddings)
    return hf_model.eval()


__all__ = [
    "from_hf_llama",
    "from_hf_olmoe",
    "to_hf_llama",
    "hf_llama_config",
    "model_config_from_hf_llama",
    "hf_llama_state_dict_to_ours",
    "our_state_dict_to_hf_llama",
]
