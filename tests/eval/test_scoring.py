"""Continuation log-likelihoods against a token-by-token float64 reference, the harness's tokenisation of
(context, continuation) pairs, acc / acc_norm and standard errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polycom_lm.config import ModelConfig
from polycom_lm.eval.results import task_result
from polycom_lm.eval.runner import example_values
from polycom_lm.eval.scoring import Scorer, encode_requests
from polycom_lm.eval.task import Example, Request
from polycom_lm.eval.tasks import HellaSwag, Lambada
from polycom_lm.models import build_model


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Σ log p(token | everything before it), each token from its own forward of just its prefix."""
    total, greedy = 0.0, True
    tokens = context + continuation
    for position in range(len(context), len(tokens)):
        logits = model(torch.tensor([tokens[:position]]))[0, -1]
        log_probs = torch.log_softmax(logits, dim=-1)
        total += float(log_probs[tokens[position]])
        greedy &= int(log_probs.argmax()) == tokens[position]
    return total, greedy


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=32,
                         activation="polynorm", max_seq_len=64, init_std=0.3)
    torch.manual_seed(3)
    return build_model(config).double().eval()


@pytest.mark.parametrize("share_context", [True, False])
def test_scores_equal_token_by_token_reference_for_shared_padded_and_truncated_inputs(model, share_context):
    generator = torch.Generator().manual_seed(0)

    def tokens(count):
        return torch.randint(1, 50, (count,), generator=generator).tolist()

    question = tokens(12)
    groups = [
        [(question, tokens(3)), (question, tokens(1)), (question, tokens(5)), (question, tokens(1))],  # 4 choices
        [(tokens(7), tokens(2)), (tokens(9), tokens(2))],  # two contexts, nothing shared
        [(question[:5] + [7], [9, 9]), (question[:5] + [8], [9, 9])],  # Winogrande-like: shared sentence start
        [(tokens(20), tokens(4))],  # cloze
        [(question, [3]), (question, [4])],  # one-token answers: one input, run once
        [(tokens(70), tokens(3))],  # longer than max_length 64: left-truncated as the harness does
    ]
    scorer = Scorer(model, max_length=64, batch_size=5, share_context=share_context)
    scored = scorer.score(groups)
    with torch.no_grad():
        for group, results in zip(groups, scored):
            for (context, continuation), result in zip(group, results):
                kept = (context + continuation)[-65:]
                expected, greedy = reference_loglikelihood(model, kept[: len(kept) - len(continuation)], continuation)
                assert result.loglikelihood == pytest.approx(expected, abs=1e-9)
                assert result.is_greedy == greedy


def test_a_shared_batch_whose_padded_width_passes_max_length_scores_exactly(model):
    # One group: a 50-token question with two 2-token answers (suffix 1 token after the shared 50); the
    # other: a 6-token question with two 30-token answers (suffix 29). Batched together, the first group's
    # rows are padded to 29 suffix tokens after position 50: padding past max_length 64 must not matter.
    generator = torch.Generator().manual_seed(1)

    def tokens(count):
        return torch.randint(1, 50, (count,), generator=generator).tolist()

    long_question, short_question = tokens(50), tokens(6)
    groups = [[(long_question, tokens(2)), (long_question, tokens(2))],
              [(short_question, tokens(30)), (short_question, tokens(30))]]
    scorer = Scorer(model, max_length=64, batch_size=4, share_context=True)
    planned = [scorer._group([(2 * g + i, c, t) for i, (c, t) in enumerate(group)]) for g, group in enumerate(groups)]
    assert [len(batch) for batch in scorer._batches(planned)] == [2]  # really one batch
    assert max(group.prefix for group in planned) + max(group.length - group.prefix for group in planned) > 64
    scored = scorer.score(groups)
    with torch.no_grad():
        for group, results in zip(groups, scored):
            for (context, continuation), result in zip(group, results):
                expected, _ = reference_loglikelihood(model, context, continuation)
                assert result.loglikelihood == pytest.approx(expected, abs=1e-9)


def test_a_continuation_the_model_predicts_greedily_is_marked_greedy(model):
    context = [5, 6, 7]
    with torch.no_grad():
        first = int(model(torch.tensor([context]))[0, -1].argmax())
        second = int(model(torch.tensor([context + [first]]))[0, -1].argmax())
    scored = Scorer(model, max_length=64).score([[(context, [first, second]), (context, [first, (second + 1) % 50])]])
    assert [result.is_greedy for result in scored[0]] == [True, False]


class CharacterTokenizer:
    """One token per character, with a dummy prefix like SentencePiece's (so prefixes do not split)."""

    bos_id, eos_id = 1, 2

    def encode_batch(self, texts):
        return [[3] + [ord(character) for character in text] for text in texts]


def test_requests_are_tokenised_as_the_harness_encode_pair():
    tokenizer = CharacterTokenizer()
    (context, continuation), = encode_requests(tokenizer, [("Question: x\nAnswer: ", "yes")])
    # The trailing space moves into the continuation; the continuation is encode(whole)[len(encode(context)):].
    assert context == [3] + [ord(c) for c in "Question: x\nAnswer:"]
    assert continuation == [ord(c) for c in " yes"]
    (context, continuation), = encode_requests(tokenizer, [("", "abc")])
    assert context == [1] and continuation == [3, ord("a"), ord("b"), ord("c")]  # empty context: the BOS prefix


def test_acc_norm_divides_by_the_length_of_the_choice_without_the_delimiter():
    example = Example((Request("q", " ab"), Request("q", " abcdef")), gold=1, choices=("ab", "abcdef"))
    # acc: the higher log-likelihood (choice 0). acc_norm: per character of the choice, -6.3/6 > -2.2/2;
    # counting the delimiter (-6.3/7 < -2.2/3) would pick choice 0.
    assert example_values(HellaSwag(), example, [-2.2, -6.3], [False, False]) == {"acc": 0.0, "acc_norm": 1.0}


def test_acc_norm_length_is_the_harness_len_of_the_string():
    # lm-evaluation-harness's acc_norm divides by len(choice) (characters; UTF-8 bytes for the ASCII of
    # every task here): "éé" counts 2 (its UTF-8 byte length, 4, would pick the other choice).
    example = Example((Request("q", " éé"), Request("q", " abc")), gold=0, choices=("éé", "abc"))
    assert example_values(HellaSwag(), example, [-2.4, -3.3], [False, False])["acc_norm"] == 0.0


def test_standard_errors_are_the_harness_mean_stderr_and_perplexity_is_per_example():
    values = np.array([1, 0, 0, 1, 1, 1, 0, 1], dtype=float)
    totals = [len(values), values.sum(), (values**2).sum(), 0, 0, 0, 0]
    result = task_result("t", ("acc",), totals)
    assert result.metrics["acc"] == pytest.approx(values.mean())
    assert result.stderr["acc"] == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
    lls = np.array([-2.0, -3.5, -1.0])
    totals = [3, 0, 0, 0, 0, lls.sum(), (lls**2).sum()]
    result = task_result("lambada", Lambada.metrics, totals)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-lls.mean()))
    assert result.stderr["perplexity"] == pytest.approx(math.exp(-lls.mean()) * lls.std(ddof=1) / math.sqrt(3))
