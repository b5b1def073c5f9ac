"""Conversion between our MoE model (`family: moe`, SwiGLU experts) and transformers' `OlmoeForCausalLM`.

The details that matter for equal logits:
- OLMoE's QK-norm normalises the whole q (k) projection output before the heads are split, so our model
  uses `qk_norm_scope: full` (not per head).
- OLMoE's experts store `gate_up_proj` [E, 2·I, H] as `[gate | up]` and `down_proj` [E, H, I]: exactly our
  `experts.in_proj` and `experts.out_proj`; the router `mlp.gate.weight` [E, H] is our `ffn.router.weight`.
- The router's softmax and top-k are OLMoE's (softmax over all experts, top-k of the probabilities, no
  renormalisation unless `norm_topk_prob`).
- `clip_qkv` (clamping q/k/v) has no counterpart here and is refused; so are attention biases.
Weights are copied, not recomputed, so a round trip is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.hf_common import (
    ATTENTION_KEYS,
    QK_NORM_KEYS,
    decoder_config_fields,
    load_exactly,
    rename_from_hf,
    rename_to_hf,
)


def model_config_from_hf_olmoe(hf_config: Any) -> ModelConfig:
    """Our `ModelConfig` (family moe, swiglu experts, full-width QK-norm) for a transformers `OlmoeConfig`."""
    if getattr(hf_config, "clip_qkv", None) is not None:
        raise ConfigError(f"OLMoE config sets clip_qkv={hf_config.clip_qkv}; our attention does not clamp q/k/v")
    if getattr(hf_config, "attention_bias", False):
        raise ConfigError("OLMoE config has attention_bias=True; our model has no biases")
    fields = decoder_config_fields(hf_config, "OLMoE")
    n_heads, head_dim = fields["n_heads"], fields["head_dim"]
    if head_dim * n_heads != hf_config.hidden_size:
        raise ConfigError("OLMoE config: num_attention_heads · head_dim must equal hidden_size (its q_norm width)")
    return ModelConfig(
        family="moe",
        **fields,
        qk_norm=True,
        qk_norm_scope="full",
        moe=MoEConfig(
            num_experts=hf_config.num_experts,
            top_k=hf_config.num_experts_per_tok,
            expert_hidden_size=hf_config.intermediate_size,
            norm_topk_prob=bool(hf_config.norm_topk_prob),
            lb_loss_weight=float(getattr(hf_config, "router_aux_loss_coef", 0.01)),
        ),
    )


def hf_olmoe_config(model_config: ModelConfig) -> Any:
    """A transformers `OlmoeConfig` equivalent to `model_config` (family moe, swiglu, full-width QK-norm)."""
    from transformers import OlmoeConfig

    from polycom_lm.models.attention import attention_shape

    moe = model_config.moe
    if model_config.family != "moe" or model_config.activation != "swiglu":
        raise ConfigError(
            f"only moe swiglu models convert to OLMoE, got family {model_config.family!r} "
            f"activation {model_config.activation!r}"
        )
    if not model_config.qk_norm or model_config.qk_norm_scope != "full":
        raise ConfigError("OLMoE normalises q and k over the full projection: set model.qk_norm: true, qk_norm_scope: full")
    if moe.expert_width is not None and moe.expert_width != moe.expert_hidden_size:
        raise ConfigError("model.moe.expert_width differs from expert_hidden_size; set expert_width to null")
    if moe.per_expert_coefficients:
        raise ConfigError("model.moe.per_expert_coefficients has no OLMoE counterpart")
    n_heads, n_kv_heads, head_dim = attention_shape(model_config)
    if n_heads * head_dim != model_config.d_model:
        raise ConfigError("OLMoE needs n_heads · head_dim == d_model (its q_norm spans hidden_size)")
    return OlmoeConfig(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.d_model,
        intermediate_size=moe.expert_hidden_size,
        num_hidden_layers=model_config.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=model_config.max_seq_len,
        rms_norm_eps=model_config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model_config.rope_theta},
        tie_word_embeddings=model_config.tie_embeddings,
        initializer_range=model_config.init_std,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.lb_loss_weight,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


# OLMoE's layer: the shared attention keys, QK-norm, and the experts (stacked exactly as ours).
_OLMOE_LAYER_KEYS = ATTENTION_KEYS + QK_NORM_KEYS + (
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.experts.in_proj", "mlp.experts.gate_up_proj"),
    ("ffn.experts.out_proj", "mlp.experts.down_proj"),
)


def hf_olmoe_state_dict_to_ours(
    hf_state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool
) -> dict[str, torch.Tensor]:
    """Rename an `OlmoeForCausalLM` state dict into our `MoETransformer`'s keys."""
    return rename_from_hf(hf_state, n_layers, tie_embeddings, _OLMOE_LAYER_KEYS)


def our_state_dict_to_hf_olmoe(
    state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool
) -> dict[str, torch.Tensor]:
    """The inverse of `hf_olmoe_state_dict_to_ours`."""
    return rename_to_hf(state, n_layers, tie_embeddings, _OLMOE_LAYER_KEYS)


def from_hf_olmoe(hf_model: nn.Module) -> nn.Module:
    """Our `MoETransformer` with the weights of a transformers `OlmoeForCausalLM` (same device and dtype)."""
    from polycom_lm.models import build_model

    model_config = model_config_from_hf_olmoe(hf_model.config)
    reference = next(hf_model.parameters())
    model = build_model(model_config, device=reference.device)
    state = hf_olmoe_state_dict_to_ours(hf_model.state_dict(), model_config.n_layers, model_config.tie_embeddings)
    load_exactly(model, state, "converting OlmoeForCausalLM", tied=model_config.tie_embeddings)
    return model.to(reference.dtype)


def to_hf_olmoe(model: nn.Module) -> nn.Module:
    """A transformers `OlmoeForCausalLM` with `model`'s weights (same device and dtype), in eval mode."""
    from transformers import OlmoeForCausalLM

    config = model.config
    reference = next(model.parameters())
    hf_model = OlmoeForCausalLM(hf_olmoe_config(config)).to(device=reference.device, dtype=reference.dtype)
    state = our_state_dict_to_hf_olmoe(model.state_dict(), config.n_layers, config.tie_embeddings)
    load_exactly(hf_model, state, "converting to OlmoeForCausalLM", tied=config.tie_embeddings)
    return hf_model.eval()


__all__ = [
    "from_hf_olmoe",
    "to_hf_olmoe",
    "hf_olmoe_config",
    "model_config_from_hf_olmoe",
    "hf_olmoe_state_dict_to_ours",
    "our_state_dict_to_hf_olmoe",
]
