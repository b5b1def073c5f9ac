"""Cutting a stream of tokenised documents into training windows, with a position to resume from.

The windows are exactly those `PackedDataset` reads from a shard of the same documents in file order:
window `j` of an epoch is tokens `[j * seq_len, j * seq_len + seq_len + 1)` of the documents concatenated
(each EOS-terminated), consecutive windows share one token, and the tail that cannot fill a window is
dropped at the end of the epoch. An optional token budget makes the epoch the stream's first `budget`
tokens (the last document cut), as `preprocess` does with `max_tokens`.

Documents arrive in `TokenChunk`s; a chunk remembers where its reader stood before its first document
(`reader`, a JSON-able position, plus `skip` documents already read from there). `position()` names the
next window's first token as (reader position, documents to skip, tokens to skip), so a resumed reader
re-reads at most one chunk and reproduces the stream from the exact token on. No I/O happens here.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


def truncate_chunk(tokens: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray], keep: int):
    """The first `keep` tokens of an encoded chunk: the documents they touch, the last one cut."""
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    documents = int(np.searchsorted(starts, keep, side="left"))
    lengths = lengths[:documents].copy()
    if documents:
        lengths[-1] -= int(starts[documents] - keep)
    return tokens[:keep], lengths, None if mask is None else mask[:documents]


@dataclass
class TokenChunk:
    """Consecutive documents of one stream: `tokens` [sum(lengths)], `lengths` [documents] (EOS included)."""

    reader: Any  # the reader's position before the chunk's first document (JSON-able)
    skip: int  # documents read from `reader` before the chunk's first one (a resumed chunk starts late)
    tokens: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray = field(init=False)  # [documents + 1] token offsets of the documents
    first_document: int = 0  # number of the chunk's first document in the epoch (for document ids)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    @property
    def size(self) -> int:
        return int(self.starts[-1])


class WindowPacker:
    """Windows of `seq_len + 1` tokens from the chunks of one epoch of one stream (see the module docstring).

    Args:
        seq_len: model input tokens per window (windows hold `seq_len + 1`).
        budget: tokens per epoch (the stream is cut there), or None for all of it.
        document_ids: also return, per window, each token's document number counted from 0.
    """

    def __init__(self, seq_len: int, budget: Optional[int] = None, document_ids: bool = False):
        self.seq_len = seq_len
        self.budget = budget
        self.document_ids = document_ids
        self.reset()

    def reset(self, epoch_tokens: int = 0, skip_tokens: int = 0) -> None:
        """Start an epoch, or resume one `epoch_tokens` tokens in, `skip_tokens` into the first chunk's first
        document."""
        self._chunks: collections.deque[TokenChunk] = collections.deque()
        self._cursor = skip_tokens  # into the first chunk
        self._epoch_tokens = epoch_tokens  # tokens of the epoch before the cursor
        self._accepted = epoch_tokens - skip_tokens  # tokens of the epoch up to the end of the last chunk
        self._documents = 0
        self.windows = 0  # windows taken since reset

    @property
    def epoch_tokens(self) -> int:
        """Tokens of the epoch before the next window's first token (`seq_len` per window taken)."""
        return self._epoch_tokens

    @property
    def full(self) -> bool:
        """The budget is used up: the epoch ends when the tokens added so far run out."""
        return self.budget is not None and self._accepted >= self.budget

    def add(self, chunk: TokenChunk) -> None:
        """Append `chunk`, cut to the budget."""
        if self.full:
            raise ValueError("the epoch's token budget is used up; start the next epoch")
        if self.budget is not None and self._accepted + chunk.size > self.budget:
            tokens, lengths, _ = truncate_chunk(chunk.tokens, chunk.lengths, None, self.budget - self._accepted)
            chunk = TokenChunk(chunk.reader, chunk.skip, tokens, lengths)
        chunk.first_document = self._documents
        self._documents += len(chunk.lengths)
        self._accepted += chunk.size
        self._chunks.append(chunk)

    def available(self) -> int:
        return sum(chunk.size for chunk in self._chunks) - self._cursor

    def take(self) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The next window: tokens [seq_len + 1] int64 and, when asked, document ids [seq_len + 1] int64."""
        length = self.seq_len + 1
        if self.available() < length:
            raise ValueError(f"{self.available()} tokens buffered, a window needs {length}")
        token_parts, document_parts = [], []
        needed, cursor = length, self._cursor
        for chunk in self._chunks:
            piece = min(needed, chunk.size - cursor)
            if piece > 0:
                token_parts.append(chunk.tokens[cursor:cursor + piece])
                if self.document_ids:
                    positions = np.arange(cursor, cursor + piece)
                    document_parts.append(chunk.first_document + np.searchsorted(chunk.starts, positions, "right") - 1)
                needed -= piece
            if needed == 0:
                break
            cursor = 0
        tokens = np.concatenate(token_parts).astype(np.int64)
        documents = None
        if self.document_ids:
            documents = np.concatenate(document_parts).astype(np.int64)
            documents -= documents[0]
        self._cursor += self.seq_len
        self._epoch_tokens += self.seq_len
        while self._chunks and self._cursor >= self._chunks[0].size:
            self._cursor -= self._chunks[0].size
            self._chunks.popleft()
        self.windows += 1
        return tokens, documents

    def position(self) -> Optional[dict[str, Any]]:
        """Where the next window starts: {"reader", "documents", "tokens", "epoch_tokens"} (JSON-able);
        None while no chunk is buffered (a window always leaves its last token buffered, so only before the
        first window of an epoch, which starts where the reader starts)."""
        if not self._chunks:
            return None
        head = self._chunks[0]
        document = int(np.searchsorted(head.starts, self._cursor, side="right")) - 1
        return {"reader": head.reader, "documents": head.skip + document,
                "tokens": self._cursor - int(head.starts[document]), "epoch_tokens": self._epoch_tokens}
