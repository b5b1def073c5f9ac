"""The Llama-style decoder: token embedding → n_layers pre-norm blocks → RMSNorm → LM head.

Plain single-device PyTorch: parallelism (FSDP, tensor / expert parallel, DeepSpeed) is applied from
outside by `polycom_lm.distributed`, which relies on the module names below.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from polycom_lm.config import ModelConfig
from polycom_lm.models.attention import Attention, attention_shape, document_causal_mask
from polycom_lm.models.feedforward import FeedForward
from polycom_lm.models.init import normal_init_
from polycom_lm.models.kv_cache import KVCache, LayerKVCache
from polycom_lm.models.lm_head import DEFAULT_CHUNK_TOKENS, LMHead
from polycom_lm.models.norm import RMSNorm
from polycom_lm.models.rope import RotaryEmbedding

# (config, layer_index) → the block's FFN module. It must define
# `init_weights(init_std, output_std, generator=None)`.
FFNFactory = Callable[[ModelConfig, int], nn.Module]


class TransformerBlock(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + ffn(ffn_norm(h)). Shapes [batch, seq, d_model].

    With `model.hidden_dropout` > 0, each branch's output is dropped out before its residual add while
    training (Megatron-LM's bias-dropout-add)."""

    def __init__(self, config: ModelConfig, layer_index: int, ffn_factory: Optional[FFNFactory] = None):
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = ffn_factory(config, layer_index) if ffn_factory is not None else FeedForward(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[LayerKVCache] = None,
    ) -> torch.Tensor:
        if cache is None:
            # Exactly four positional inputs: the sequence-parallel plan prepares these (tensor_parallel.py).
            attended = self.attention(self.attention_norm(x), cos, sin, attention_mask)
        else:
            attended = self.attention(self.attention_norm(x), cos, sin, attention_mask, cache=cache)
        h = x + self._dropout(attended)
        return h + self._dropout(self.ffn(self.ffn_norm(h)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_dropout > 0 and self.training:
            return F.dropout(x, self.hidden_dropout, training=True)
        return x

    def init_weights(self, init_std: float, output_std: float, generator: Optional[torch.Generator] = None) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(init_std, output_std, generator)
        init = getattr(self.ffn, "init_weights", None)
        if not callable(init):
            raise TypeError(
                f"FFN module {type(self.ffn).__name__} of layer {self.layer_index} has no "
                "init_weights(init_std, output_std, generator=None) method"
            )
        init(init_std, output_std, generator)


class Transformer(nn.Module):
    """Decoder-only language model.

    forward(input_ids [batch, seq] int64, document_ids [batch, seq] int64 or None) → logits
    [batch, seq, vocab_size]; with `targets` [batch, seq] int64 (-100: not counted) it returns the summed
    token cross-entropy instead, `loss_chunk_tokens` tokens at a time (`models/lm_head.py`). With `document_ids`, a token attends only to earlier tokens of its own
    document (packed sequences); positions are not reset per document, which changes nothing under RoPE
    because scores depend only on the distance between tokens of one document.

    Construction on a real device initialises the weights (`init_weights`); on `meta` it allocates nothing,
    and `to_empty(device=...)` followed by `init_weights()` gives the weights a direct build would have with
    the same seed (see `build_model`).
    """

    def __init__(self, config: ModelConfig, ffn_factory: Optional[FFNFactory] = None):
        super().__init__()
        self.config = config
        _, _, head_dim = attention_shape(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(config, layer_index, ffn_factory) for layer_index in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = LMHead(config.d_model, config.vocab_size, impl=config.linear_impl)
        self._tie_weights()
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def _tie_weights(self) -> None:
        if self.config.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        result = super()._apply(fn, recurse)
        # `to_empty` and device moves may replace each Parameter separately, which unties the LM head.
        self._tie_weights()
        return result

    def forward(
        self,
        input_ids: torch.Tensor,
        document_ids: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> torch.Tensor:
        h = self.hidden_states(input_ids, document_ids)
        if self.output is None:  # a pipeline stage before the last: its hidden states go to the next stage
            return h
        if targets is None:
            return self.output(h)
        return self.output(h, targets=targets, chunk_tokens=loss_chunk_tokens)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        document_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [batch, seq, d_model]; `self.output` of them are the logits.

        Inference passes a `cache` (the tokens it already holds precede `input_ids`; this call appends
        to it) and, for right-padded rows, `lengths` [batch] (real tokens per row). Scoring applies the
        LM head to the few positions it needs only.
        """
        if cache is not None:
            return self._cached_hidden_states(input_ids, cache, lengths)
        seq_len = input_ids.shape[1]
        if document_ids is not None and document_ids.shape != input_ids.shape[:2]:
            raise ValueError(
                f"document_ids shape {tuple(document_ids.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
            )
        cos, sin = self.rope(seq_len)
        attention_mask = document_causal_mask(document_ids) if document_ids is not None else None
        # A pipeline stage (distributed/pipeline.py) holds only some modules: without the embedding its
        # input is the previous stage's hidden states [batch, seq, d_model]; without the norm it returns them.
        if self.tok_embeddings is None:
            h = input_ids
        else:
            h = self.tok_embeddings(input_ids)
            if self.config.hidden_dropout > 0 and self.training:  # Megatron-LM's embedding dropout
                h = F.dropout(h, self.config.hidden_dropout, training=True)
        for layer in self.layers:
            h = layer(h, cos, sin, attention_mask)
        return self.norm(h) if self.norm is not None else h

    def _cached_hidden_states(
        self, input_ids: torch.Tensor, cache: KVCache, lengths: Optional[torch.Tensor]
    ) -> torch.Tensor:
        batch, seq_len = input_ids.shape
        positions, attention_mask = cache.begin_step(batch, seq_len, lengths, input_ids.device)
        cos, sin = self.rope.at(positions)
        h = self.tok_embeddings(input_ids)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cos, sin, attention_mask, layer_cache)
        return self.norm(h)

    def new_cache(self) -> KVCache:
        """An empty KV cache for `hidden_states(..., cache=...)`."""
        return KVCache(len(self.layers))

    @property
    def output_std(self) -> float:
        """Std of the residual-branch output projections (o_proj, out_proj) at init."""
        if self.config.init_depth_scaled:
            return self.config.init_std / math.sqrt(2 * self.config.n_layers)
        return self.config.init_std

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """(Re)initialise every parameter and buffer: normal(0, init_std) for embeddings, projections and
        the LM head; std init_std / sqrt(2·n_layers) for o_proj and out_proj when `init_depth_scaled`; norm
        gains to one; activation coefficients to their own init; RoPE tables recomputed. Every normal draw
        is truncated at ± `init_truncation` standard deviations when that is set. Draws come from
        `generator` (on the parameters' device) or the default generator, in module order."""
        std = self.config.init_std
        truncation = self.config.init_truncation
        normal_init_(self.tok_embeddings.weight, std, truncation, generator)
        self.rope.reset_parameters()
        for layer in self.layers:
            layer.init_weights(std, self.output_std, generator)
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            normal_init_(self.output.weight, std, truncation, generator)
