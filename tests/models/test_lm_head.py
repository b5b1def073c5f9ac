"""The fused (chunked) linear cross-entropy against the logits path, in float64, float32 and bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from polycom_lm.models.lm_head import IGNORE_INDEX, LMHead, chunk_loss_and_logit_grad, linear_cross_entropy


def _reference(x, weight, targets):
    logits = F.linear(x, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


def _inputs(dtype, tokens=(3, 7), d=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, d, generator=generator, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=generator, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, tokens, generator=generator)
    targets[0, 2] = IGNORE_INDEX
    targets[-1, :3] = IGNORE_INDEX
    return x, weight, targets


def _loss_and_grads(fn, x, weight, targets, grad_scale=1.7):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(x, weight, targets)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [1, 4, 8, 21, 1000])
def test_matches_the_logits_path_in_float64(chunk_tokens):
    x, weight, targets = _inputs(torch.float64)
    expected = _loss_and_grads(_reference, x, weight, targets)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=chunk_tokens), x, weight, targets)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_matches_the_logits_path_in_float32_and_ignores_masked_tokens():
    x, weight, targets = _inputs(torch.float32, tokens=(4, 33), d=32, vocab=301)
    expected = _loss_and_grads(_reference, x, weight, targets)
    got = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=16), x, weight, targets)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-6)
    # Masked tokens get no gradient at all.
    assert got[1][targets == IGNORE_INDEX].abs().max() == 0


def test_bf16_autocast_matches_the_logits_path_under_autocast():
    x, weight, targets = _inputs(torch.float32, tokens=(2, 64), d=64, vocab=512)

    def autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)

        return run

    exact = _loss_and_grads(_reference, x.double(), weight.double(), targets)
    logits_path = _loss_and_grads(autocast(_reference), x, weight, targets)
    fused = _loss_and_grads(autocast(lambda *a: linear_cross_entropy(*a, chunk_tokens=48)), x, weight, targets)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    # Both round the logits and the matmul operands to bf16 alike; the fused path is as close to the
    # float64 truth as the logits path (its weight gradient sums per-chunk products in float32).
    for name, f, l, e in zip(("loss", "input grad", "weight grad"), fused, logits_path, exact):
        fused_error = (f.double() - e).abs().max().item()
        logits_error = (l.double() - e).abs().max().item()
        assert fused_error <= 1.25 * logits_error + 1e-6, (name, fused_error, logits_error)
    torch.testing.assert_close(fused[0], logits_path[0], rtol=1e-5, atol=0)


def test_tied_weight_gets_both_gradients():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(40, 8).double()
    ids = torch.randint(0, 40, (2, 5))
    targets = torch.randint(0, 40, (2, 5))

    def loss(fused):
        embedding.zero_grad()
        h = torch.tanh(embedding(ids))
        out = linear_cross_entropy(h, embedding.weight, targets, chunk_tokens=3) if fused else _reference(
            h, embedding.weight, targets
        )
        out.backward()
        return embedding.weight.grad.clone()

    torch.testing.assert_close(loss(True), loss(False), rtol=1e-10, atol=1e-12)


def test_no_gradients_are_computed_without_grad():
    x, weight, targets = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, chunk_tokens=4)
    torch.testing.assert_close(loss, _reference(x, weight, targets).detach())


def test_chunk_step_alone():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
    targets = torch.tensor([1, IGNORE_INDEX])
    loss, grad = chunk_loss_and_logit_grad(logits.clone(), targets)  # float32 logits are overwritten
    probs = logits[0].softmax(0)
    assert loss.item() == pytest.approx(-probs[1].log().item())
    torch.testing.assert_close(grad[0], probs - torch.tensor([0.0, 1.0, 0.0]))
    assert grad[1].abs().max() == 0


def test_lm_head_is_a_linear_layer_without_targets():
    head = LMHead(8, 11)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(x), F.linear(x, head.weight))
    assert set(head.state_dict()) == {"weight"}


def test_shape_and_chunk_errors():
    x, weight, targets = _inputs(torch.float32)
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(x, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(x, weight, targets, chunk_tokens=0)
