"""The paper's analyses against hand-computed values: effective rank of matrices with known singular
values, and layer-wise cosine similarity on a model whose layers are hand-built maps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polycom_lm.study.analysis import effective_rank, effective_ranks, hidden_state_cosine_similarity


def _with_singular_values(values: list[float], rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """U diag(values) Vᵀ with random orthonormal U [rows, k], V [columns, k]."""
    generator = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(columns, k, generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert effective_rank(5.0 * torch.eye(4)) == pytest.approx(4.0)  # scale does not matter
    assert effective_rank(_with_singular_values([3.0], 6, 9)) == pytest.approx(1.0)
    assert effective_rank(_with_singular_values([1.0, 1.0, 1.0, 1.0], 10, 6)) == pytest.approx(4.0)
    # σ = (2, 1, 1): p = (1/2, 1/4, 1/4), H = 1.5 ln 2, erank = 2^1.5
    assert effective_rank(_with_singular_values([2.0, 1.0, 1.0], 8, 5)) == pytest.approx(2**1.5)
    # σ = (3, 1): p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(_with_singular_values([3.0, 1.0], 5, 5, seed=3)) == pytest.approx(math.exp(entropy))
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_effective_ranks_cover_every_layer_and_expert_of_a_model():
    from polycom_lm.config import ModelConfig, MoEConfig
    from polycom_lm.models import build_model

    dense = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=3, n_heads=2, ffn_hidden_size=8,
                                    activation="polynorm"), device="cpu")
    with torch.no_grad():
        dense.layers[1].ffn.in_proj.weight.copy_(_with_singular_values([1.0, 1.0], 12, 16))
    ranks = effective_ranks(dense)
    assert len(ranks["in_proj"]) == 3 and ranks["max_rank"] == {"in_proj": 12, "out_proj": 12}
    assert ranks["in_proj"][1] == pytest.approx(2.0)
    moe = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, family="moe", activation="relu",
                                  moe=MoEConfig(num_experts=3, top_k=1, expert_hidden_size=8)), device="cpu")
    ranks = effective_ranks(moe)
    assert [len(layer) for layer in ranks["per_expert"]["out_proj"]] == [3, 3]
    assert ranks["out_proj"][0] == pytest.approx(sum(ranks["per_expert"]["out_proj"][0]) / 3)


class _Map(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x, cos, sin, attention_mask=None):
        return self.function(x)


def test_cosine_similarity_of_hand_built_layers():
    """Embeddings are unit vectors e_0; layer 1 negates (cos −1), layer 2 adds e_1 to −e_0 (cos 1/√2),
    layer 3 scales by 3 (cos 1)."""
    from polycom_lm.config import ModelConfig
    from polycom_lm.models import build_model

    model = build_model(ModelConfig(vocab_size=10, d_model=4, n_layers=3, n_heads=1, ffn_hidden_size=4), device="cpu")
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    model.layers = nn.ModuleList([_Map(lambda x: -x), _Map(lambda x: x + e1), _Map(lambda x: 3 * x)])
    result = hidden_state_cosine_similarity(model, [torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (1, 7))])
    assert result["values"] == pytest.approx([-1.0, 1 / math.sqrt(2), 1.0])
    assert result["tokens"] == 17
