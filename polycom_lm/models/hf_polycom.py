"""Conversion between our models (dense or MoE, any activation) and `PolycomForCausalLM`, the transformers
architecture `polycom-lm export` ships as remote code (`polycom_lm/pretrained/remote/modeling_polycom.py`)
for models that Llama / OLMoE cannot express.

Attention, norms, embeddings and head use the keys every conversion shares (`hf_common`). The FFN:
- dense: `mlp.up_proj` (plus `mlp.gate_proj` for gated activations, our `in_proj` being `[gate | up]`),
  `mlp.down_proj`, and the PolyCom coefficients `mlp.act_fn.{weight, bias}`;
- MoE: router `mlp.gate`, `mlp.experts.{gate_up_proj | up_proj}` and `mlp.experts.down_proj` (our stacked
  expert weights as they are), coefficients `mlp.experts.act_fn.{weight, bias}` (shared or per expert).
The config is a plain dict of `PolycomConfig` fields, so this module needs no transformers import.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from polycom_lm.activations import ACTIVATIONS, build_activation_from_config
from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.attention import attention_shape
from polycom_lm.models.feedforward import ffn_width
from polycom_lm.models.hf_common import ATTENTION_KEYS, QK_NORM_KEYS, rename_from_hf, rename_to_hf
from polycom_lm.models.moe_layer import expert_width

# The activations the shipped modeling file implements (see its `plain_activation` / `polycom_activation`).
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "squared_relu", "swiglu", "geglu", "polyrelu", "polynorm", "poly")
COEFFICIENT_ACTIVATIONS = ("polyrelu", "polynorm", "poly")


def polycom_config_fields(model_config: ModelConfig) -> dict[str, Any]:
    """The `PolycomConfig` fields describing `model_config` (token ids are the exporter's business)."""
    activation = model_config.activation
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"activation {activation!r} has no PolycomForCausalLM implementation; exportable activations: "
            f"{', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    n_heads, n_kv_heads, head_dim = attention_shape(model_config)
    module = build_activation_from_config(model_config)
    moe = model_config.family == "moe"
    if model_config.family not in ("dense", "moe"):
        raise ConfigError(f"model family {model_config.family!r} cannot be exported; families: dense, moe")
    return {
        "vocab_size": model_config.vocab_size,
        "hidden_size": model_config.d_model,
        "intermediate_size": expert_width(model_config) if moe else ffn_width(model_config),
        "num_hidden_layers": model_config.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": activation,
        "activation_order": model_config.activation_order,
        "polynorm_eps": float(getattr(module, "eps", 1e-6)),
        "gelu_approximate": getattr(module, "approximate", "none"),
        "max_position_embeddings": model_config.max_seq_len,
        "rope_theta": model_config.rope_theta,
        "rms_norm_eps": model_config.norm_eps,
        "qk_norm": model_config.qk_norm_scope if model_config.qk_norm else None,
        "num_experts": model_config.moe.num_experts if moe else 0,
        "num_experts_per_tok": model_config.moe.top_k if moe else 1,
        "norm_topk_prob": bool(model_config.moe.norm_topk_prob) if moe else False,
        "per_expert_coefficients": bool(model_config.moe.per_expert_coefficients) if moe else False,
        "initializer_range": model_config.init_std,
        "tie_word_embeddings": model_config.tie_embeddings,
    }


def model_config_from_polycom(fields: Mapping[str, Any]) -> ModelConfig:
    """Our `ModelConfig` for `PolycomConfig` fields (the inverse of `polycom_config_fields`).

    The width is restored as the parameter-matched `ffn_hidden_size` (`moe.expert_hidden_size`) when it is
    one, else set explicitly, so that the usual configs round-trip unchanged.
    """
    activation = fields["hidden_act"]
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"PolycomConfig hidden_act {activation!r} is not one of {', '.join(SUPPORTED_ACTIVATIONS)}")
    if fields.get("gelu_approximate", "none") != "none":
        raise ConfigError("PolycomConfig gelu_approximate 'tanh' has no counterpart in our GELU (exact erf form)")
    width = int(fields["intermediate_size"])
    gated = ACTIVATIONS.get(activation).gated
    hidden_size = width if gated or (2 * width) % 3 else 2 * width // 3
    explicit_width = None if (gated or 3 * hidden_size // 2 == width) else width
    qk_norm = fields.get("qk_norm")
    n_experts = int(fields.get("num_experts") or 0)
    moe = MoEConfig()
    if n_experts:
        moe = MoEConfig(
            num_experts=n_experts, top_k=int(fields["num_experts_per_tok"]), expert_hidden_size=hidden_size,
            expert_width=explicit_width, norm_topk_prob=bool(fields.get("norm_topk_prob", False)),
            per_expert_coefficients=bool(fields.get("per_expert_coefficients", False)),
        )
    n_heads = int(fields["num_attention_heads"])
    return ModelConfig(
        family="moe" if n_experts else "dense",
        vocab_size=int(fields["vocab_size"]),
        d_model=int(fields["hidden_size"]),
        n_layers=int(fields["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(fields.get("num_key_value_heads") or n_heads),
        head_dim=int(fields.get("head_dim") or int(fields["hidden_size"]) // n_heads),
        ffn_hidden_size=hidden_size if not n_experts else ModelConfig.ffn_hidden_size,
        ffn_width=explicit_width if not n_experts else None,
        activation=activation,
        activation_order=int(fields.get("activation_order", 3)),
        max_seq_len=int(fields["max_position_embeddings"]),
        rope_theta=float(fields["rope_theta"]),
        norm_eps=float(fields["rms_norm_eps"]),
        qk_norm=qk_norm is not None,
        qk_norm_scope=qk_norm or "head",
        tie_embeddings=bool(fields.get("tie_word_embeddings", False)),
        init_std=float(fields.get("initializer_range", 0.02)),
        moe=moe,
    )


def _layer_keys(model_config: ModelConfig) -> tuple[tuple[str, str], ...]:
    """(our suffix, transformers suffix) of every renamed key in a layer; the dense gated in-projection is
    split / joined separately."""
    keys = ATTENTION_KEYS + (QK_NORM_KEYS if model_config.qk_norm else ())
    gated = ACTIVATIONS.get(model_config.activation).gated
    coefficients = model_config.activation in COEFFICIENT_ACTIVATIONS
    if model_config.family == "moe":
        keys += (
            ("ffn.router.weight", "mlp.gate.weight"),
            ("ffn.experts.in_proj", "mlp.experts.gate_up_proj" if gated else "mlp.experts.up_proj"),
            ("ffn.experts.out_proj", "mlp.experts.down_proj"),
        )
        if coefficients:
            keys += (("ffn.experts.activation.weight", "mlp.experts.act_fn.weight"),
                     ("ffn.experts.activation.bias", "mlp.experts.act_fn.bias"))
        return keys
    keys += (("ffn.out_proj.weight", "mlp.down_proj.weight"),)
    if not gated:
        keys += (("ffn.in_proj.weight", "mlp.up_proj.weight"),)
    if coefficients:
        keys += (("ffn.activation.weight", "mlp.act_fn.weight"), ("ffn.activation.bias", "mlp.act_fn.bias"))
    return keys


def _dense_gated(model_config: ModelConfig) -> bool:
    return model_config.family == "dense" and ACTIVATIONS.get(model_config.activation).gated


def our_state_dict_to_polycom(state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → `PolycomForCausalLM` keys (no `lm_head.weight` when the embeddings are tied)."""
    hf_state = rename_to_hf(state, model_config.n_layers, model_config.tie_embeddings, _layer_keys(model_config))
    if _dense_gated(model_config):
        for index in range(model_config.n_layers):
            gate, up = state[f"layers.{index}.ffn.in_proj.weight"].chunk(2, dim=0)
            hf_state[f"model.layers.{index}.mlp.gate_proj.weight"] = gate
            hf_state[f"model.layers.{index}.mlp.up_proj.weight"] = up
    return hf_state


def polycom_state_dict_to_ours(hf_state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `our_state_dict_to_polycom`."""
    state = rename_from_hf(hf_state, model_config.n_layers, model_config.tie_embeddings, _layer_keys(model_config))
    if _dense_gated(model_config):
        for index in range(model_config.n_layers):
            mlp = f"model.layers.{index}.mlp."
            state[f"layers.{index}.ffn.in_proj.weight"] = torch.cat(
                [hf_state[f"{mlp}gate_proj.weight"], hf_state[f"{mlp}up_proj.weight"]], dim=0
            )
    return state


__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "model_config_from_polycom",
    "our_state_dict_to_polycom",
    "polycom_config_fields",
    "polycom_state_dict_to_ours",
]
