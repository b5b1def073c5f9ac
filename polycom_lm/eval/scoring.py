"""Continuation log-likelihoods, batched, with the shared part of a question's inputs computed once.

Tokens follow lm-evaluation-harness (`LM._encode_pair`, `HFLM._loglikelihood_tokens`): trailing spaces of
the context move to the continuation; the continuation's tokens are those of `encode(context +
continuation)` after the first `len(encode(context))`; the model reads `(context + continuation)[-(max_length
+ 1):][:-1]` and the continuation tokens are scored at its last positions. A request returns (sum of the
continuation's token log-probabilities, whether greedy decoding reproduces it).

A *group* is the requests of one question. Their inputs usually start alike (the prompt, shared by all
choices; Winogrande's sentence up to the option); with `share_context` that common prefix runs once per
group into a KV cache and only each input's remainder runs per request, all groups of a batch together
(`KVCache` rows of different lengths are right-padded and masked). Identical inputs (one-token answers,
e.g. BoolQ's "no" / "yes") run once. The LM head is applied to the scored positions only.

`model` is our plain model (`hidden_states`, `output`, `new_cache`). A model wrapped by a sharding engine
(FSDP, tensor parallel, ZeRO-3) is called as `model(input_ids) -> logits` instead (`wrapped=True`), without
context sharing, and `forward_count` can make every rank run the same number of forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from polycom_lm.data.tokenizer import Tokenizer
from polycom_lm.errors import DataError


@dataclass(frozen=True)
class Scored:
    """Sum of the continuation's token log-probabilities (nats) and whether each token was the argmax."""

    loglikelihood: float
    is_greedy: bool


def encode_requests(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of (context, continuation) pairs, as the harness's `_encode_pair`."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        moved.append((context, continuation))
    texts = sorted({text for context, continuation in moved for text in (context, context + continuation) if text})
    ids = dict(zip(texts, tokenizer.encode_batch(texts)))
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    encoded = []
    for context, continuation in moved:
        if not context:  # the harness scores an empty context after its prefix token
            encoded.append(([prefix], ids[continuation]))
            continue
        context_ids = ids[context]
        continuation_ids = ids[context + continuation][len(context_ids):]
        if not continuation_ids:
            raise DataError(f"continuation {continuation!r} of context ...{context[-40:]!r} encodes to no tokens")
        encoded.append((context_ids, continuation_ids))
    return encoded


@dataclass
class _Row:
    """One distinct model input of a group and the requests scored on it."""

    tokens: list[int]
    requests: list[tuple[int, list[int]]]  # (request index, continuation ids)


@dataclass
class _Group:
    rows: list[_Row]
    prefix: int  # tokens shared by every row and computed once (0: no sharing)

    @property
    def length(self) -> int:
        return max(len(row.tokens) for row in self.rows)


def _common_prefix(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(sequence) for sequence in sequences)
    for index in range(length):
        if any(sequence[index] != first[index] for sequence in sequences[1:]):
            return index
    return length


class Scorer:
    """Scores groups of encoded requests with `model`; see the module docstring."""

    def __init__(self, model: nn.Module, *, max_length: int, batch_size: int = 32, share_context: bool = True,
                 wrapped: bool = False):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.share_context = share_context and not wrapped
        self.wrapped = wrapped
        self.device = next(model.parameters()).device

    # ---------------------------------------------------------------------------------------- planning
    def _group(self, requests: list[tuple[int, list[int], list[int]]]) -> _Group:
        rows: dict[tuple[int, ...], _Row] = {}
        for index, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise DataError(f"a continuation of {len(continuation)} tokens exceeds the model's {self.max_length}")
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            rows.setdefault(tuple(tokens), _Row(tokens, [])).requests.append((index, continuation))
        ordered = list(rows.values())
        prefix = 0
        if self.share_context and len(ordered) > 1:
            # Every row keeps at least one token of its own to run after the prefix.
            prefix = min(_common_prefix([row.tokens for row in ordered]), min(len(row.tokens) for row in ordered) - 1)
        return _Group(ordered, prefix)

    def _batches(self, groups: list[_Group]) -> list[list[_Group]]:
        """Groups of similar lengths (longest first, as the harness) with at most `batch_size` rows each;
        shared-prefix groups and plain ones go to different batches."""
        batches = []
        for shared in (True, False):
            chosen = sorted((g for g in groups if (g.prefix > 0) == shared), key=lambda g: (g.prefix, g.length),
                            reverse=True)
            current: list[_Group] = []
            rows = 0
            for group in chosen:
                if current and rows + len(group.rows) > self.batch_size:
                    batches.append(current)
                    current, rows = [], 0
                current.append(group)
                rows += len(group.rows)
            if current:
                batches.append(current)
        return batches

    # ---------------------------------------------------------------------------------------- running
    def score(self, groups: list[list[tuple[list[int], list[int]]]],
              forward_count: Optional[Callable[[int], int]] = None) -> list[list[Scored]]:
        """groups[g][i] = (context ids, continuation ids) → results[g][i]. `forward_count(local count)` returns
        how many forwards to run in all (the most of any rank); the extra ones run on a dummy input."""
        flat = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
        planned = []
        position = 0
        for group in groups:
            planned.append(self._group([(position + i, c, t) for i, (c, t) in enumerate(group)]))
            position += len(group)
        batches = self._batches(planned)
        total = forward_count(len(batches)) if forward_count is not None else len(batches)
        results: list[Optional[Scored]] = [None] * len(flat)
        # A sharding engine's buffers must stay ordinary tensors for the training steps that follow.
        with torch.no_grad() if self.wrapped else torch.inference_mode():
            for batch in batches:
                for index, scored in (self._run_shared(batch) if batch[0].prefix else self._run_plain(batch)):
                    results[index] = scored
            for _ in range(total - len(batches)):
                self._forward_logits(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        out: list[list[Scored]] = [[] for _ in groups]
        for (g, _), scored in zip(flat, results):
            out[g].append(scored)
        return out

    def _forward_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(sequence) for sequence in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device)

    def _run_plain(self, batch: list[_Group]):
        rows = [row for group in batch for row in group.rows]
        ids, _ = self._pad([row.tokens for row in rows])  # right padding: causal rows never see it
        if self.wrapped:
            logits = self._forward_logits(ids)
            flat_logits = logits.reshape(-1, logits.shape[-1])
            return self._select(rows, lambda r, p: r * ids.shape[1] + p, flat_logits, logits_given=True)
        hidden = self.model.hidden_states(ids)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return self._select(rows, lambda r, p: r * ids.shape[1] + p, flat)

    def _run_shared(self, batch: list[_Group]):
        prefixes = [group.rows[0].tokens[: group.prefix] for group in batch]
        prefix_ids, prefix_lengths = self._pad(prefixes)
        cache = self.model.new_cache()
        prefix_hidden = self.model.hidden_states(prefix_ids, cache=cache, lengths=prefix_lengths)
        rows, owners = [], []
        for number, group in enumerate(batch):
            rows.extend(group.rows)
            owners.extend([number] * len(group.rows))
        suffix_ids, suffix_lengths = self._pad([row.tokens[batch[g].prefix:] for row, g in zip(rows, owners)])
        row_cache = cache.select(torch.tensor(owners, device=self.device))
        suffix_hidden = self.model.hidden_states(suffix_ids, cache=row_cache, lengths=suffix_lengths)
        width, prefix_width = suffix_ids.shape[1], prefix_ids.shape[1]
        offset = len(batch) * prefix_width
        width_model = prefix_hidden.shape[-1]
        flat = torch.cat([prefix_hidden.reshape(-1, width_model), suffix_hidden.reshape(-1, width_model)])

        def locate(row: int, position: int) -> int:
            group = owners[row]
            prefix = batch[group].prefix
            if position < prefix:
                return group * prefix_width + position
            return offset + row * width + position - prefix

        return self._select(rows, locate, flat)

    def _select(self, rows: list[_Row], locate: Callable[[int, int], int], flat: torch.Tensor, logits_given: bool = False):
        """Gather the scored positions of every request from `flat` ([positions, d_model] hidden states, or
        logits), apply the head, and sum each continuation's log-probabilities."""
        index, targets, spans = [], [], []
        for row_number, row in enumerate(rows):
            length = len(row.tokens)
            for request, continuation in row.requests:
                start = len(index)
                for offset, token in enumerate(continuation):
                    index.append(locate(row_number, length - len(continuation) + offset))
                    targets.append(token)
                spans.append((request, start, len(index)))
        chosen = flat.index_select(0, torch.tensor(index, device=flat.device))
        logits = chosen if logits_given else self.model.output(chosen)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        target = torch.tensor(targets, device=flat.device)
        token_ll = log_probs.gather(1, target[:, None])[:, 0].double().cpu()
        greedy = (log_probs.argmax(dim=-1) == target).cpu()
        return [(request, Scored(float(token_ll[start:end].sum()), bool(greedy[start:end].all())))
                for request, start, end in spans]
