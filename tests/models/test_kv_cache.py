"""The KV cache: cached, chunked and padded forwards give the logits of one full forward; the training
forward (no cache) is untouched."""

from __future__ import annotations

import pytest
import torch

from polycom_lm.config import ModelConfig, MoEConfig
from polycom_lm.models import build_model


def tiny(family: str, **overrides) -> torch.nn.Module:
    config = ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_hidden_size=32, activation="polynorm", max_seq_len=64,
                         moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16), **overrides)
    torch.manual_seed(0)
    return build_model(config).double().eval()


@pytest.mark.parametrize("family, qk_norm", [("dense", False), ("dense", True), ("moe", True)])
def test_chunked_cached_forward_equals_one_full_forward(family, qk_norm):
    model = tiny(family, qk_norm=qk_norm, qk_norm_scope="full" if family == "moe" else "head")
    tokens = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        expected = model(tokens)
        cache = model.new_cache()
        chunks = [model.output(model.hidden_states(tokens[:, a:b], cache=cache)) for a, b in ((0, 9), (9, 10), (10, 21))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=0, atol=1e-12)
    assert cache.length == 21 and cache.next_position.tolist() == [21, 21]


def test_right_padded_prefixes_and_selected_rows_see_only_their_own_tokens():
    model = tiny("dense")
    first, second = torch.randint(0, 64, (14,)), torch.randint(0, 64, (9,))
    with torch.no_grad():
        cache = model.new_cache()
        padded = torch.stack([first[:10], torch.cat([second[:6], torch.full((4,), 5)])])
        model.hidden_states(padded, cache=cache, lengths=torch.tensor([10, 6]))
        rows = cache.select(torch.tensor([1, 0, 1]))
        suffixes = torch.stack([second[6:9], first[10:13], torch.cat([second[6:8], torch.tensor([7])])])
        logits = model.output(model.hidden_states(suffixes, cache=rows, lengths=torch.tensor([3, 3, 2])))
        full_first, full_second = model(first[None])[0], model(second[None])[0]
    torch.testing.assert_close(logits[0], full_second[6:9], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[1], full_first[10:13], rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[2, :2], full_second[6:8], rtol=0, atol=1e-12)
    # Negative control: the same suffix without the cache (positions from 0, no prefix) differs.
    with torch.no_grad():
        alone = model(second[None, 6:9])[0]
    assert (alone - full_second[6:9]).abs().max() > 1e-3


def test_forward_without_cache_is_hidden_states_then_head():
    model = tiny("dense")
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.output(model.hidden_states(tokens)), rtol=0, atol=0)


def test_positions_beyond_max_seq_len_are_a_one_line_error():
    from polycom_lm.errors import ConfigError

    model = tiny("dense")
    cache = model.new_cache()
    with torch.no_grad():
        model.hidden_states(torch.zeros(1, 60, dtype=torch.long), cache=cache)
        with pytest.raises(ConfigError, match="beyond model.max_seq_len 64"):
            model.hidden_states(torch.zeros(1, 5, dtype=torch.long), cache=cache)
