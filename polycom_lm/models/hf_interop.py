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


def _rope_theta(hf_config: Any) -> float:
    parameters = getattr(hf_config, "rope_parameters", None)  # transformers ≥ 5
    if isinstance(parameters, dict):
        rope_type = parameters.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"Llama config uses rope_type {rope_type!r}; only 'default' RoPE converts")
        return float(parameters["rope_theta"])
    scaling = getattr(hf_config, "rope_scaling", None)  # transformers 4.x
    if scaling:
        raise ConfigError(f"Llama config uses rope_scaling {scaling!r}; only unscaled RoPE converts")
    return float(hf_config.rope_theta)


def model_config_from_hf_llama(hf_config: Any) -> ModelConfig:
    """Our `ModelConfig` (activation swiglu) for a transformers `LlamaConfig`."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"Llama config hidden_act {hf_config.hidden_act!r}: only 'silu' (SwiGLU) converts")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise ConfigError(f"Llama config has {flag}=True; our model has no biases")
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    return ModelConfig(
        family="dense",
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        activation="swiglu",
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )


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


def hf_llama_state_dict_to_ours(hf_state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Rename (and stack gate/up of) a `LlamaForCausalLM` state dict into our `Transformer`'s keys."""
    ours = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
    }
    if not tie_embeddings:
        ours["output.weight"] = hf_state["lm_head.weight"]
    for index in range(n_layers):
        hf, our = f"model.layers.{index}.", f"layers.{index}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours[f"{our}attention.{name}.weight"] = hf_state[f"{hf}self_attn.{name}.weight"]
        ours[f"{our}attention_norm.weight"] = hf_state[f"{hf}input_layernorm.weight"]
        ours[f"{our}ffn_norm.weight"] = hf_state[f"{hf}post_attention_layernorm.weight"]
        ours[f"{our}ffn.in_proj.weight"] = torch.cat(
            [hf_state[f"{hf}mlp.gate_proj.weight"], hf_state[f"{hf}mlp.up_proj.weight"]], dim=0
        )
        ours[f"{our}ffn.out_proj.weight"] = hf_state[f"{hf}mlp.down_proj.weight"]
    return ours


def our_state_dict_to_hf_llama(state: dict[str, torch.Tensor], n_layers: int, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """The inverse of `hf_llama_state_dict_to_ours`."""
    hf_state = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["tok_embeddings.weight"] if tie_embeddings else state["output.weight"],
    }
    for index in range(n_layers):
        hf, our = f"model.layers.{index}.", f"layers.{index}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hf_state[f"{hf}self_attn.{name}.weight"] = state[f"{our}attention.{name}.weight"]
        hf_state[f"{hf}input_layernorm.weight"] = state[f"{our}attention_norm.weight"]
        hf_state[f"{hf}post_attention_layernorm.weight"] = state[f"{our}ffn_norm.weight"]
        gate, up = state[f"{our}ffn.in_proj.weight"].chunk(2, dim=0)
        hf_state[f"{hf}mlp.gate_proj.weight"] = gate
        hf_state[f"{hf}mlp.up_proj.weight"] = up
        hf_state[f"{hf}mlp.down_proj.weight"] = state[f"{our}ffn.out_proj.weight"]
    return hf_state


def _load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy `state` into `module`, failing on any missing or unexpected key (ties count as present)."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    tied_head = {"lm_head.weight", "output.weight"}
    missing = [key for key in missing if key not in tied_head or not _is_tied(module)]
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(f"{what}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    with torch.no_grad():
        own = module.state_dict(keep_vars=True)
        for key, tensor in state.items():
            own[key].copy_(tensor)


def _is_tied(module: nn.Module) -> bool:
    input_embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else module.tok_embeddings
    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else module.output
    return output.weight is input_embeddings.weight


def from_hf_llama(hf_model: nn.Module) -> Transformer:
    """Our `Transformer` with the weights of a transformers `LlamaForCausalLM` (same device and dtype)."""
    model_config = model_config_from_hf_llama(hf_model.config)
    reference = next(hf_model.parameters())
    with torch.device("meta"):
        model = Transformer(model_config)
    model.to_empty(device=reference.device)
    model.init_weights()
    hf_state = hf_model.state_dict()
    _load_exactly(
        model,
        hf_llama_state_dict_to_ours(hf_state, model_config.n_layers, model_config.tie_embeddings),
        "converting LlamaForCausalLM",
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
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    _load_exactly(hf_model, state, "converting to LlamaForCausalLM")
    return hf_model.eval()


__all__ = [
    "from_hf_llama",
    "to_hf_llama",
    "hf_llama_config",
    "model_config_from_hf_llama",
    "hf_llama_state_dict_to_ours",
    "our_state_dict_to_hf_llama",
]

from polycom_lm.models.hf_olmoe import from_hf_olmoe  # noqa: E402,F401  (OLMoE conversion lives in hf_olmoe.py)
