"""A key/value cache for inference: incremental decoding and scoring many continuations of one prefix.

Training never builds one; a model called without a cache takes exactly its training path.

Rows of one cache may hold prefixes of different lengths (right-padded batches): `valid` marks which
cached slots hold real tokens, and `next_position` is each row's next RoPE position, so a padded slot is
never attended to and never shifts a row's positions (padding itself sits at position 0). `select(rows)` copies rows (one prefix → the k
continuations that share it).
"""

from __future__ import annotations

from typing import Optional

import torch


class LayerKVCache:
    """Keys and values of one attention layer: [batch, kv_heads, cached, head_dim] each, after RoPE."""

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys/values [batch, kv_heads, new, head_dim]; returns all of them."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


class KVCache:
    """Per-layer caches plus, per row, which cached slots are real tokens and the next position."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKVCache() for _ in range(n_layers)]
        self.valid: Optional[torch.Tensor] = None  # [batch, cached] bool
        self.next_position: Optional[torch.Tensor] = None  # [batch] int64

    @property
    def length(self) -> int:
        """Number of cached slots (padding included)."""
        return 0 if self.valid is None else self.valid.shape[1]

    def begin_step(
        self, batch: int, new_tokens: int, lengths: Optional[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Account for `new_tokens` tokens per row (`lengths` [batch] of them real, the rest right padding;
        None: all real). Returns (positions [batch, new_tokens] int64, attention mask [batch, 1,
        new_tokens, cached + new_tokens] bool, True = attend): a token sees the real cached slots of its
        row and the tokens of this step up to itself."""
        steps = torch.arange(new_tokens, device=device)
        if self.next_position is None:
            self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
            self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        if self.next_position.shape[0] != batch:
            raise ValueError(f"cache holds {self.next_position.shape[0]} rows, the input has {batch}")
        positions = self.next_position[:, None] + steps[None, :]
        causal = torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=device).tril()
        past = self.valid[:, None, :].expand(batch, new_tokens, self.length)
        mask = torch.cat([past, causal.expand(batch, new_tokens, new_tokens)], dim=-1)[:, None]
        if lengths is None:
            new_valid = torch.ones(batch, new_tokens, dtype=torch.bool, device=device)
            self.next_position = self.next_position + new_tokens
        else:
            lengths = lengths.to(device)
            new_valid = steps[None, :] < lengths[:, None]
            self.next_position = self.next_position + lengths
            # Padding takes position 0: never attended to, and a row's real length plus the batch's
            # padded width may pass model.max_seq_len.
            positions = torch.where(new_valid, positions, 0)
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        return positions, mask

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose row i is a copy of row `rows[i]` of this one."""
        chosen = KVCache(len(self.layers))
        for source, target in zip(self.layers, chosen.layers):
            if source.keys is not None:
                target.keys = source.keys.index_select(0, rows)
                target.values = source.values.index_select(0, rows)
        if self.valid is not None:
            chosen.valid = self.valid.index_select(0, rows)
            chosen.next_position = self.next_position.index_select(0, rows)
        return chosen
