"""Parameter counts and training FLOPs per token, from the model itself built on `meta` (no memory).

Training FLOPs per token follow the PaLM paper's appendix B (Chowdhery et al., 2022):

    training_flops_per_token = 3 · forward,   forward = 2 · N_matmul + 2 · L · H · Q · T

- N_matmul: weights that multiply each token in the forward pass: every layer's q/k/v/o projections, the
  FFN's active matmul weights (its `forward_flops_per_token()` / 2 if it defines one, for MoE: only the
  routed experts), and the LM head (d_model · vocab). Embedding lookups, norms, activations, softmax and
  the residual adds are not matmuls and are left out, as in PaLM. A multiply-add counts 2 FLOPs.
- Attention scores (q·kᵀ) and values (p·v): each costs 2 · H · Q FLOPs per key a query attends to, with L
  layers, H query heads of size Q. Under a causal mask a query sees T/2 keys on average for sequence
  length T, so the two together cost 2 · H · Q · T per layer (PaLM's 12·L·H·Q·T for training counts the
  full T×T matrix; we count what a causal kernel computes).
- Backward costs twice the forward (gradients with respect to inputs and to weights): ×3 in all.

So training_flops_per_token = 6 · N_matmul + 6 · L · H · Q · T. An FFN module (e.g. from an
`ffn_factory`) may define `forward_flops_per_token() -> float` and `active_parameter_count() -> int`;
without them every ≥2-D parameter of it is a matmul weight used by every token.
"""

from __future__ import annotations

from torch import nn

from polycom_lm.config import ModelConfig
from polycom_lm.models.attention import attention_shape


def parameter_counts(model_config: ModelConfig) -> dict[str, int]:
    """{"total", "non_embedding", "active"} parameter counts of `model_config`'s model.

    Tied embeddings count once. "non_embedding" leaves out the token embedding and the LM head (Kaplan et
    al. 2020). "active" counts the parameters one token uses (all of them for a dense model).
    """
    from polycom_lm.models import build_model

    return count_parameters(build_model(model_config, device="meta"))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Like `parameter_counts`, for an already built model (any device)."""
    total = sum(parameter.numel() for parameter in model.parameters())  # .parameters() dedupes tied weights
    embedding = model.tok_embeddings.weight.numel()
    if model.output.weight is not model.tok_embeddings.weight:
        embedding += model.output.weight.numel()
    inactive = 0
    for layer in model.layers:
        active = getattr(layer.ffn, "active_parameter_count", None)
        if callable(active):
            inactive += sum(parameter.numel() for parameter in layer.ffn.parameters()) - int(active())
    return {"total": total, "non_embedding": total - embedding, "active": total - inactive}


def ffn_forward_flops_per_token(ffn: nn.Module) -> float:
    """Forward matmul FLOPs one token spends in `ffn` (2 per multiply-add)."""
    own = getattr(ffn, "forward_flops_per_token", None)
    if callable(own):
        return float(own())
    return 2.0 * sum(parameter.numel() for parameter in ffn.parameters() if parameter.dim() >= 2)


def forward_flops_breakdown(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a built model at sequence length `seq_len`, by part: attention
    projections (q, k, v, o), causal attention scores and values, FFN (every matrix: SwiGLU's gate, up and
    down; a non-gated activation's in and out; only the routed experts of an MoE), LM head."""
    config = model.config
    n_heads, _, head_dim = attention_shape(config)
    parts = {"attention_projections": 0.0, "attention_scores": 0.0, "ffn": 0.0,
             "lm_head": 2.0 * config.d_model * config.vocab_size}
    for layer in model.layers:
        attention = layer.attention
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
        parts["attention_projections"] += 2.0 * sum(projection.weight.numel() for projection in projections)
        parts["attention_scores"] += 2.0 * n_heads * head_dim * seq_len  # causal scores + values: 2·(2·H·Q)·(T/2)
        parts["ffn"] += ffn_forward_flops_per_token(layer.ffn)
    return parts


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a built model at sequence length `seq_len` (see the module docstring)."""
    return sum(forward_flops_breakdown(model, seq_len).values())


def training_flops_breakdown(model_config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward + backward FLOPs per token by part (`forward_flops_breakdown` × 3); they sum to
    `training_flops_per_token`."""
    from polycom_lm.models import build_model

    return {part: 3.0 * flops for part, flops in forward_flops_breakdown(build_model(model_config, device="meta"), seq_len).items()}


def training_flops_per_token(model_config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 · N_matmul + 6 · L · H · Q · T (module docstring)."""
    from polycom_lm.models import build_model

    return 3.0 * forward_flops_per_token(build_model(model_config, device="meta"), seq_len)
