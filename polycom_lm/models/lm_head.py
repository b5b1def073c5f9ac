"""The output head, and a cross-entropy that never holds the whole batch's logits.

`LMHead(h)` gives logits [..., vocab] like any `nn.Linear`. `LMHead(h, targets=t, chunk_tokens=c)` gives the
summed token cross-entropy (nats, a float32 scalar; float64 for float64 inputs) instead, computed `c` tokens at a time: each chunk's
logits are formed, turned into its loss and into the gradients of the head's input and weight, and freed
before the next chunk. The logits path keeps [tokens, vocab] logits alive from the forward to the backward
(plus a float32 copy for the loss): at 8 × 2048 tokens and a 32,000-token vocabulary that is 1 GB in bf16
and 2 GB in float32. The chunked path keeps the input's gradient [tokens, d_model] and a float32 weight
gradient [vocab, d_model] instead, and runs the same three matmuls (logits, input gradient, weight
gradient), all in the forward; its backward only scales them by the incoming gradient. This is the
fused linear cross-entropy of Liger-Kernel / Apple's cut-cross-entropy, without their custom kernels.

Numerics match `F.cross_entropy(F.linear(h, W).float(), t, reduction="sum", ignore_index=-100)`: the
matmuls run in the autocast dtype where autocast is on (bf16 logits, as `F.linear` under autocast gives),
the softmax and the loss in float32, and the weight gradient is summed over chunks in float32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from polycom_lm.models.linear import Linear

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048

ChunkFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def chunk_loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: logits [c, vocab] (any float dtype), targets [c] int64 (IGNORE_INDEX: not counted) →
    (summed cross-entropy; d loss / d logits [c, vocab]), both in float32 or the logits' wider dtype.
    Float32 or float64 logits are overwritten by their gradient (the chunk's only [c, vocab] buffer)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    target_logits = logits.gather(1, safe_targets)
    loss = ((log_norm - target_logits).squeeze(1) * valid).sum()
    grad = logits.sub_(log_norm).exp_()
    grad.scatter_add_(1, safe_targets, torch.full_like(target_logits, -1.0))
    return loss, grad.mul_(valid.unsqueeze(1))


class _LinearCrossEntropy(torch.autograd.Function):
    """x [n, d], weight [vocab, d], targets [n] → summed cross-entropy of x @ weightᵀ; see module docstring."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_tokens: int, chunk_fn: ChunkFn):  # type: ignore[override]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(x.dtype, weight.dtype)
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
            loss = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=x.device)
            grad_x = torch.empty_like(x) if want_x else None
            grad_weight = torch.zeros_like(weight, dtype=loss.dtype) if want_weight else None
            for start in range(0, x.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                chunk_loss, grad_logits = chunk_fn(xc[rows] @ wc.t(), targets[rows])
                loss += chunk_loss
                if want_x or want_weight:
                    grad_logits = grad_logits.to(compute_dtype)
                    if want_x:
                        grad_x[rows] = grad_logits @ wc
                    if want_weight:
                        grad_weight += grad_logits.t() @ xc[rows]
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if want_weight else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_x, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32))
        return (
            (grad_x * scale).to(grad_x.dtype) if grad_x is not None else None,
            (grad_weight * scale).to(grad_weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_fn: ChunkFn = chunk_loss_and_logit_grad,
) -> torch.Tensor:
    """Summed token cross-entropy of `x @ weightᵀ` against `targets`, `chunk_tokens` tokens at a time.
    x [..., d], weight [vocab, d], targets [...] int64 (IGNORE_INDEX where a token does not count)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match the input's {tuple(x.shape[:-1])}")
    return _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), chunk_tokens, chunk_fn)


class LMHead(Linear):
    """The model's output projection (`nn.Linear` keys and init, no bias); forward(h) → logits, or
    forward(h, targets, chunk_tokens) → summed cross-entropy through `linear_cross_entropy`. Called as a
    module either way, so that engines which gather parameters around a module's forward (FSDP, DeepSpeed
    ZeRO-3) see the weight gathered."""

    def __init__(self, in_features: int, out_features: int, impl: str = "auto", **kwargs):
        super().__init__(in_features, out_features, bias=False, impl=impl, **kwargs)
        self._chunk_fn: ChunkFn = chunk_loss_and_logit_grad

    def compile_loss(self) -> None:
        """Run each chunk's softmax, loss and logit gradient as one compiled region (`training.compile`)."""
        self._chunk_fn = torch.compile(chunk_loss_and_logit_grad)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, targets: Optional[torch.Tensor] = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, chunk_tokens, self._chunk_fn)
