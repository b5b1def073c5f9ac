"""Attention against an independent float64 reference: explicit softmax, per-head loop, RoPE written as a
complex rotation, QK-norm of both scopes, grouped-query heads and packed-document masks."""

import math

import pytest
import torch

from polycom_lm.config import ModelConfig
from polycom_lm.models.attention import Attention, document_causal_mask
from polycom_lm.models.rope import RotaryEmbedding


def reference_rms(x, gain, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain


def reference_rope(u, theta):
    """u [seq, head_dim] → rotated; pair (u[j], u[j + D/2]) is the complex number rotated by pos·θ^(−2j/D)."""
    seq_len, head_dim = u.shape
    half = head_dim // 2
    z = torch.complex(u[:, :half], u[:, half:])
    exponents = torch.arange(half, dtype=torch.float64) * 2 / head_dim
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta ** (-exponents)[None, :]
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def reference_attention(x, module, config, documents):
    """x [seq, d_model] float64, one sequence; documents [seq] or None."""
    n_heads = config.n_heads
    n_kv = config.n_kv_heads or n_heads
    head_dim = config.d_model // n_heads
    q, k, v = x @ module.q_proj.weight.T, x @ module.k_proj.weight.T, x @ module.v_proj.weight.T
    if config.qk_norm and config.qk_norm_scope == "full":
        q = reference_rms(q, module.q_norm.weight, config.norm_eps)
        k = reference_rms(k, module.k_norm.weight, config.norm_eps)
    seq_len = x.shape[0]
    outputs = []
    for head in range(n_heads):
        kv_head = head // (n_heads // n_kv)
        qh = q[:, head * head_dim : (head + 1) * head_dim]
        kh = k[:, kv_head * head_dim : (kv_head + 1) * head_dim]
        vh = v[:, kv_head * head_dim : (kv_head + 1) * head_dim]
        if config.qk_norm and config.qk_norm_scope == "head":
            qh = reference_rms(qh, module.q_norm.weight, config.norm_eps)
            kh = reference_rms(kh, module.k_norm.weight, config.norm_eps)
        qh, kh = reference_rope(qh, config.rope_theta), reference_rope(kh, config.rope_theta)
        scores = qh @ kh.T / math.sqrt(head_dim)
        for i in range(seq_len):
            for j in range(seq_len):
                if j > i or (documents is not None and documents[i] != documents[j]):
                    scores[i, j] = float("-inf")
        outputs.append(torch.softmax(scores, dim=-1) @ vh)
    return torch.cat(outputs, dim=-1) @ module.o_proj.weight.T


@pytest.mark.parametrize(
    "n_kv_heads, qk_norm, scope, packed",
    [
        (None, False, "head", False),
        (2, False, "head", True),
        (1, True, "head", True),
        (2, True, "full", False),
        (4, True, "full", True),
    ],
)
def test_attention_matches_float64_reference(n_kv_heads, qk_norm, scope, packed):
    config = ModelConfig(
        d_model=32, n_heads=4, n_kv_heads=n_kv_heads, qk_norm=qk_norm, qk_norm_scope=scope, rope_theta=500.0,
        max_seq_len=16,
    )
    torch.manual_seed(0)
    module = Attention(config).double()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.5)  # norm gains too, so a wrong gain shape shows
    rope = RotaryEmbedding(8, 16, config.rope_theta)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    documents = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [7] * 12]) if packed else None
    mask = document_causal_mask(documents) if packed else None
    cos, sin = rope(12)
    ours = module(x, cos, sin, mask)
    for b in range(2):
        expected = reference_attention(x[b], module, config, documents[b] if packed else None)
        torch.testing.assert_close(ours[b], expected, rtol=0, atol=1e-5)


def test_document_causal_mask_blocks_other_documents_and_the_future():
    mask = document_causal_mask(torch.tensor([[3, 3, 5, 5]]))
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert mask.shape == (1, 1, 4, 4)
    assert torch.equal(mask[0, 0], expected)


def test_attention_runs_on_a_head_sharded_projection():
    """A column-sharded q/k/v and row-sharded o_proj (what tensor parallelism does) give the partial sums
    of the full output, with no change to the model code."""
    config = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=8)
    torch.manual_seed(0)
    full = Attention(config)
    rope = RotaryEmbedding(8, 8, config.rope_theta)
    cos, sin = rope(6)
    x = torch.randn(1, 6, 32)
    total = torch.zeros(1, 6, 32)
    for shard in range(2):
        local = Attention(config)
        with torch.no_grad():
            local.q_proj.weight = torch.nn.Parameter(full.q_proj.weight.chunk(2, 0)[shard].clone())
            local.k_proj.weight = torch.nn.Parameter(full.k_proj.weight.chunk(2, 0)[shard].clone())
            local.v_proj.weight = torch.nn.Parameter(full.v_proj.weight.chunk(2, 0)[shard].clone())
            local.o_proj.weight = torch.nn.Parameter(full.o_proj.weight.chunk(2, 1)[shard].clone())
        total += local(x, cos, sin)
    torch.testing.assert_close(total, full(x, cos, sin), rtol=1e-5, atol=1e-6)
