"""Causal self-attention with grouped-query heads, optional QK-norm and packed-document masking."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.init import normal_init_
from polycom_lm.models.kv_cache import LayerKVCache
from polycom_lm.models.linear import Linear
from polycom_lm.models.norm import RMSNorm
from polycom_lm.models.rope import apply_rotary


def attention_shape(config: ModelConfig) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of `config`, checked."""
    for key in ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len"):
        if getattr(config, key) < 1:
            raise ConfigError(f"model.{key} must be positive, got {getattr(config, key)}")
    n_heads = config.n_heads
    n_kv_heads = config.n_kv_heads if config.n_kv_heads is not None else n_heads
    if config.head_dim is None and config.d_model % n_heads:
        raise ConfigError(
            f"model.d_model {config.d_model} is not divisible by model.n_heads {n_heads}; set model.head_dim"
        )
    head_dim = config.head_dim if config.head_dim is not None else config.d_model // n_heads
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(f"head size {head_dim} (model.head_dim or d_model / n_heads) must be even for RoPE")
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ConfigError(f"model.n_heads {n_heads} must be a multiple of model.n_kv_heads {n_kv_heads}")
    return n_heads, n_kv_heads, head_dim


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] document ids → bool mask [batch, 1, seq, seq]: query i sees key j iff j ≤ i and both
    tokens belong to the same document (True = attend)."""
    seq_len = document_ids.shape[-1]
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    return (same_document & causal)[:, None]


class Attention(nn.Module):
    """Multi-head / grouped-query causal attention through `scaled_dot_product_attention`.

    Projections: `q_proj` [d_model → n_heads·head_dim], `k_proj`, `v_proj` [d_model → n_kv_heads·head_dim],
    `o_proj` [n_heads·head_dim → d_model], no biases. The number of heads is read from the projections'
    output at run time (`view(batch, seq, -1, head_dim)`), so a tensor-parallel plan that column-shards
    q/k/v and row-shards o_proj runs this code unchanged on its local heads.

    QK-norm (`qk_norm`): scope "head" normalises each head over head_dim (one gain of size head_dim shared
    by the heads); scope "full" normalises the whole q (k) projection output, as OLMoE does. Note that with
    scope "full" a head-sharded tensor-parallel plan must compute the norm over all heads.

    Dropout (training only, as Megatron-LM applies it): `attention_dropout` on the attention weights
    (inside `scaled_dot_product_attention`). The residual-branch dropout (`hidden_dropout`) is the block's.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        n_heads, n_kv_heads, head_dim = attention_shape(config)
        self.head_dim = head_dim
        self.dropout = config.attention_dropout
        self.init_truncation = config.init_truncation
        self.q_proj = Linear(config.d_model, n_heads * head_dim, bias=False, impl=config.linear_impl)
        self.k_proj = Linear(config.d_model, n_kv_heads * head_dim, bias=False, impl=config.linear_impl)
        self.v_proj = Linear(config.d_model, n_kv_heads * head_dim, bias=False, impl=config.linear_impl)
        self.o_proj = Linear(n_heads * head_dim, config.d_model, bias=False, impl=config.linear_impl)
        self.qk_norm_scope = config.qk_norm_scope if config.qk_norm else None
        if self.qk_norm_scope == "head":
            self.q_norm = RMSNorm(head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.norm_eps)
        elif self.qk_norm_scope == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, eps=config.norm_eps)
        elif self.qk_norm_scope is not None:
            raise ConfigError(f"model.qk_norm_scope must be 'head' or 'full', got {self.qk_norm_scope!r}")

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        """x [batch, seq, d_model]; cos, sin [seq, head_dim] or [batch, seq, head_dim] float32;
        attention_mask None (plain causal) or bool [batch, 1, seq, keys] (True = attend, already causal).
        With a `cache` (inference), this step's keys and values are appended to it and the queries attend
        over all of them; the mask must then be given (keys = cached + seq). Returns [batch, seq, d_model]."""
        batch, seq_len, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm_scope == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq_len, -1, self.head_dim)
        k = k.view(batch, seq_len, -1, self.head_dim)
        v = v.view(batch, seq_len, -1, self.head_dim)
        if self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq, head_dim]
        if cache is not None:
            if attention_mask is None:
                raise ValueError("attention with a KV cache needs an explicit attention mask")
            k, v = cache.append(k, v)
        repeats = q.shape[1] // k.shape[1]
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            # Flash attention handles grouped heads natively: no copy of k and v.
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=repeats > 1, dropout_p=dropout
            )
        else:
            # Masked kernels (memory-efficient, math) do not all take grouped heads: expand k, v. Query
            # head h reads kv head h // repeats, the grouping of transformers' `repeat_kv`.
            if repeats > 1:
                k = k.repeat_interleave(repeats, dim=1)
                v = v.repeat_interleave(repeats, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(out)

    def init_weights(self, init_std: float, output_std: float, generator: Optional[torch.Generator] = None) -> None:
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            normal_init_(projection.weight, init_std, self.init_truncation, generator)
        normal_init_(self.o_proj.weight, output_std, self.init_truncation, generator)
        if self.qk_norm_scope is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()
