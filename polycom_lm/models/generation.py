"""Autoregressive sampling with a KV cache: the prompt runs once, then one token per forward.

Greedy when `temperature` is 0 (the argmax, as transformers' `generate(do_sample=False)`); otherwise
logits / temperature, then top-k, then top-p (nucleus: the smallest set of most likely tokens whose
probability reaches `top_p`, as transformers' `TopPLogitsWarper`), sampled with `generator`.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from polycom_lm.errors import ConfigError


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> int:
    """One token id from logits [vocab] (see the module docstring)."""
    if temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if 0 < top_k < scores.numel():
        threshold = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if top_p < 1:
        ascending, order = torch.sort(scores)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probabilities = scores.softmax(dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids after `prompt_ids`, stopping after `eos_id` or when the
    sequence reaches `model.config.max_seq_len`. `model` is our plain model (`hidden_states`, `output`)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    max_length = model.config.max_seq_len
    if not prompt_ids:
        raise ConfigError("the prompt is empty; give some text to continue")
    if len(prompt_ids) >= max_length:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the model reads at most {max_length}")
    device = next(model.parameters()).device
    cache = model.new_cache()
    hidden = model.hidden_states(torch.tensor([prompt_ids], device=device), cache=cache)
    length = len(prompt_ids)
    for _ in range(max_new_tokens):
        token = next_token(model.output(hidden[0, -1]), temperature, top_k, top_p, generator)
        yield token
        length += 1
        if token == eos_id or length >= max_length:
            return
        hidden = model.hidden_states(torch.tensor([[token]], device=device), cache=cache)
