"""PolycomForCausalLM: a standalone transformers implementation of the models polycom_lm trains.

`polycom-lm export` copies this file (and configuration_polycom.py) into every exported folder whose model
has no transformers counterpart, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

works on a machine with torch and transformers only: nothing here imports polycom_lm. The code is written
from the formulas, plainly: PolyNorm is Σᵢ wᵢ·N(x^(r-i)) + b with N(y) = y / sqrt(mean(y², last dim) + eps),
computed in float32 whatever the weights' dtype; MoE layers loop over experts.

Layout (Llama's names): `model.embed_tokens`, `model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
self_attn.{q,k}_norm, post_attention_layernorm, mlp}`, `model.norm`, `lm_head`. Dense `mlp`: `up_proj`
[width, hidden] and `down_proj`, plus `gate_proj` for gated activations (gate(x) · up(x)); MoE `mlp`:
router `gate` [experts, hidden], `experts.{gate_up_proj | up_proj}` [experts, (2·)width, hidden] and
`experts.down_proj` [experts, hidden, width]. PolyCom coefficients: `act_fn.weight` [r] (weight[0]
multiplies the highest power) and `act_fn.bias` [1], or [experts, r] and [experts] per expert.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_polycom import PolycomConfig

try:  # transformers >= 5: initialisers that leave weights loaded from the checkpoint alone
    from transformers import initialization as _init
except ImportError:  # transformers 4.x calls _init_weights only on modules with missing weights
    _init = nn.init

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # very old transformers: no cache, generation recomputes the prefix
    DynamicCache = None

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 5 renamed the cache argument and output field from `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

# Activations that carry learnable coefficients (weight [r], bias [1]).
POLYCOM_ACTIVATIONS = ("polyrelu", "polynorm", "poly")
GATED_ACTIVATIONS = ("swiglu", "geglu")


def polycom_activation(x, weight, bias, kind: str, eps: float):
    """Σᵢ weight[i] · f(x)^(r-i) + bias, each power normalised over the last dim for polynorm; computed in
    float32 and cast back. x [..., width], weight [r], bias [1]."""
    dtype = x.dtype
    x = x.float()
    if kind == "polyrelu":
        x = F.relu(x)
    weight, bias = weight.float(), bias.float()
    order = weight.shape[0]
    out = bias
    for index in range(order):
        power = x ** (order - index)
        if kind == "polynorm":
            power = power * torch.rsqrt(power.pow(2).mean(-1, keepdim=True) + eps)
        out = out + weight[index] * power
    return out.to(dtype)


def plain_activation(x, kind: str, gelu_approximate: str):
    """relu / gelu / squared_relu of x, or of gate · up for the gated kinds (x = [gate | up])."""
    if kind == "relu":
        return F.relu(x)
    if kind == "gelu":
        return F.gelu(x, approximate=gelu_approximate)
    if kind == "squared_relu":
        return F.relu(x).square()
    gate, up = x.chunk(2, dim=-1)
    if kind == "swiglu":
        return F.silu(gate) * up
    if kind == "geglu":
        return F.gelu(gate, approximate=gelu_approximate) * up
    raise ValueError(f"unknown hidden_act {kind!r}")


class PolycomActivation(nn.Module):
    """The configured activation; holds the coefficients of the PolyCom kinds (`per_rows` sets of them)."""

    def __init__(self, config: PolycomConfig, per_rows: int = 0):
        super().__init__()
        self.kind = config.hidden_act
        self.eps = config.polynorm_eps
        self.gelu_approximate = config.gelu_approximate
        if self.kind in POLYCOM_ACTIVATIONS:
            order = config.activation_order
            shape = (per_rows, order) if per_rows else (order,)
            self.weight = nn.Parameter(torch.full(shape, 1.0 / order))
            self.bias = nn.Parameter(torch.zeros(per_rows if per_rows else 1))

    def forward(self, x, expert: Optional[int] = None):
        if self.kind not in POLYCOM_ACTIVATIONS:
            return plain_activation(x, self.kind, self.gelu_approximate)
        weight, bias = self.weight, self.bias
        if expert is not None and weight.dim() == 2:
            weight, bias = weight[expert], bias[expert : expert + 1]
        return polycom_activation(x, weight, bias, self.kind, self.eps)


class PolycomRMSNorm(nn.Module):
    """x / sqrt(mean(x², last dim) + eps), statistics in float32, cast back, times the gain."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        dtype = x.dtype
        wide = x.float()
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(dtype)


def rotary_tables(config: PolycomConfig, positions, device):
    """cos, sin [batch, seq, head_dim] float32 for positions [batch, seq] (rotate-half layout)."""
    head_dim = config.head_dim
    inverse_frequency = 1.0 / (
        config.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    )
    angles = positions.to(device).float()[..., None] * inverse_frequency
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x [batch, heads, seq, head_dim] rotated in float32; cos, sin [batch, seq, head_dim]."""
    dtype = x.dtype
    wide = x.float()
    first, second = wide.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (wide * cos[:, None] + rotated * sin[:, None]).to(dtype)


class PolycomAttention(nn.Module):
    def __init__(self, config: PolycomConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * head_dim, hidden, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm == "head":
            self.q_norm = PolycomRMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = PolycomRMSNorm(head_dim, config.rms_norm_eps)
        elif self.qk_norm == "full":
            self.q_norm = PolycomRMSNorm(self.num_heads * head_dim, config.rms_norm_eps)
            self.k_norm = PolycomRMSNorm(self.num_kv_heads * head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        repeats = self.num_heads // self.num_kv_heads
        if repeats > 1:  # query head h reads key/value head h // repeats
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class PolycomMLP(nn.Module):
    """Dense FFN: down(act(up(x))), or down(act([gate(x) | up(x)])) for gated activations."""

    def __init__(self, config: PolycomConfig):
        super().__init__()
        width = config.intermediate_size
        self.gated = config.hidden_act in GATED_ACTIVATIONS
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = PolycomActivation(config)

    def forward(self, x):
        hidden = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1) if self.gated else self.up_proj(x)
        return self.down_proj(self.act_fn(hidden))


class PolycomExperts(nn.Module):
    def __init__(self, config: PolycomConfig):
        super().__init__()
        experts, width, hidden = config.num_experts, config.intermediate_size, config.hidden_size
        self.gated = config.hidden_act in GATED_ACTIVATIONS
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        else:
            self.up_proj = nn.Parameter(torch.empty(experts, width, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))
        self.act_fn = PolycomActivation(config, per_rows=experts if config.per_expert_coefficients else 0)

    def forward(self, tokens, expert: int):
        """tokens [n, hidden] routed to `expert` → [n, hidden]."""
        in_proj = self.gate_up_proj if self.gated else self.up_proj
        return F.linear(self.act_fn(F.linear(tokens, in_proj[expert]), expert), self.down_proj[expert])


class PolycomSparseMoE(nn.Module):
    """Dropless top-k routing: softmax over all experts in float32, top-k of the probabilities
    (renormalised when `norm_topk_prob`), output Σ_k p_k · expert_k(x)."""

    def __init__(self, config: PolycomConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = PolycomExperts(config)

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = F.linear(tokens.float(), self.gate.weight.float())
        weights, chosen = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for expert in torch.unique(chosen).tolist():
            rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
            contribution = self.experts(tokens[rows], expert) * weights[rows, slot, None]
            out.index_add_(0, rows, contribution.to(out.dtype))
        return out.reshape(shape)


class PolycomDecoderLayer(nn.Module):
    def __init__(self, config: PolycomConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PolycomAttention(config, layer_idx)
        self.post_attention_layernorm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = PolycomSparseMoE(config) if config.num_experts else PolycomMLP(config)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class PolycomPreTrainedModel(PreTrainedModel):
    config_class = PolycomConfig
    base_model_prefix = "model"
    _no_split_modules = ["PolycomDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, PolycomRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, PolycomExperts):
            for name in ("gate_up_proj", "up_proj", "down_proj"):
                if hasattr(module, name):
                    _init.normal_(getattr(module, name), mean=0.0, std=std)
        elif isinstance(module, PolycomActivation) and hasattr(module, "weight"):
            _init.constant_(module.weight, 1.0 / module.weight.shape[-1])
            _init.zeros_(module.bias)


class PolycomModel(PolycomPreTrainedModel):
    def __init__(self, config: PolycomConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PolycomDecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = PolycomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final-norm hidden states [batch, seq, hidden]. `attention_mask` [batch, cached + seq] (1 = real
        token) allows padding; `cache` (a transformers Cache) holds earlier tokens' keys and values."""
        batch, seq = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=device).expand(batch, seq)
        query_positions = torch.arange(past, past + seq, device=device)
        key_positions = torch.arange(past + seq, device=device)
        mask = (key_positions[None, :] <= query_positions[:, None])[None, None]  # [1, 1, seq, keys]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -(past + seq):].bool()
        # A query always sees itself, so that a left-padding position never has an all-masked row (NaN).
        mask = (mask | (key_positions[None, :] == query_positions[:, None])).expand(batch, 1, seq, past + seq)
        cos, sin = rotary_tables(self.config, position_ids, device)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)


class PolycomForCausalLM(PolycomPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]

    def __init__(self, config: PolycomConfig):
        super().__init__(config)
        self.model = PolycomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        return_dict=None,
        **kwargs,
    ):
        cache = kwargs.pop("cache", None) or past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and DynamicCache is not None:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers 4.x
                cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


__all__ = ["PolycomForCausalLM", "PolycomModel", "PolycomPreTrainedModel"]
