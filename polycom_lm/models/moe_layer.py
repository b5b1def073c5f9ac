"""The OLMoE-style dropless mixture-of-experts FFN layer.

    router logits = x Wᵣᵀ (fp32) → p = softmax(logits) → top-k experts and their p (renormalised to sum 1
    when `norm_topk_prob`) → every token goes to all of its k experts (no capacity, nothing dropped) →
    output = Σ_k p_k · expert_k(x)

Tokens are grouped by expert with one stable sort, each projection of all the experts is one grouped
matmul (`moe_experts.grouped_linear`), and the results are put back in token order with a gather and a
sum over k (deterministic, unlike an atomic scatter-add). Where the experts' work happens is a pluggable
`dispatcher`: `LocalDispatcher` runs every expert here; expert parallelism attaches one that sends tokens
to the ranks holding their experts (`polycom_lm.distributed.expert_parallel`), so this file never imports
torch.distributed.

Each forward leaves on the layer, for the model to collect:
- `aux_losses`: unweighted `load_balancing` (Switch / OLMoE: E · Σᵢ fᵢ·Pᵢ, fᵢ the fraction of the T·k
  assignments that went to expert i, Pᵢ the mean router probability of i; 1.0 when perfectly balanced)
  and `router_z` (mean over tokens of logsumexp(logits)²).
- `routing_statistics`: detached tokens-per-expert counts [E] and mean router entropy (nats).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from polycom_lm.activations import ACTIVATIONS, build_activation_from_config
from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError
from polycom_lm.models.init import normal_init_
from polycom_lm.models.moe_experts import GroupedExperts


def expert_width(model_config: ModelConfig) -> int:
    """Width of each expert's activation output: `moe.expert_width` if set; else `moe.expert_hidden_size`
    for gated activations (SwiGLU) and 3/2 of it for non-gated ones, which keeps parameters equal."""
    moe = model_config.moe
    if moe.expert_width is not None:
        return moe.expert_width
    try:
        return ACTIVATIONS.get(model_config.activation).parameter_matched_width(moe.expert_hidden_size)
    except ValueError:
        raise ConfigError(
            f"model.moe.expert_hidden_size {moe.expert_hidden_size}: 3/2 of it (the expert width of non-gated "
            f"activation {model_config.activation!r}) is not an integer; use an even size or set "
            f"model.moe.expert_width"
        ) from None


def sort_by_expert(top_experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_experts [T, k] → (order [T·k]: assignment indices sorted by expert, stable; counts [E] int64).

    Assignment a = t·k + j is token t's j-th choice; `order // k` are the token indices of the sorted rows.
    """
    flat = top_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add of integers is exact and, unlike bincount, needs no device-to-host sync.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def combine_sorted(
    expert_rows: torch.Tensor, order: torch.Tensor, top_weights: torch.Tensor
) -> torch.Tensor:
    """expert_rows [T·k, d] (in `order`), top_weights [T, k] → Σ_j top_weights[t, j] · row of (t, j): [T, d]."""
    num_tokens, top_k = top_weights.shape
    weighted = expert_rows * top_weights.reshape(-1)[order].unsqueeze(-1).to(expert_rows.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return weighted[inverse].view(num_tokens, top_k, -1).sum(dim=1)


class Dispatcher(Protocol):
    def __call__(
        self, tokens: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        """tokens [T, d], top_experts [T, k] (global expert ids), top_weights [T, k] → [T, d]."""
        ...


class LocalDispatcher:
    """All experts live in this process."""

    def __call__(
        self, tokens: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        order, counts = sort_by_expert(top_experts, experts.num_experts)
        rows = tokens[order // top_experts.shape[1]]
        return combine_sorted(experts(rows, counts), order, top_weights)


class MoEFeedForward(nn.Module):
    """x [batch, seq, d_model] → [batch, seq, d_model]: a router and `GroupedExperts`.

    Parameters: `router.weight` [E, d_model]; `experts.in_proj`, `experts.out_proj` and the activation's.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        validate_moe_model_config(config)
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.router = nn.Linear(config.d_model, moe.num_experts, bias=False)
        self.experts = GroupedExperts(
            num_experts=moe.num_experts,
            d_model=config.d_model,
            width=expert_width(config),
            activation=build_activation_from_config(config),
            activation_name=config.activation,
            per_expert_coefficients=moe.per_expert_coefficients,
            matmul=moe.expert_matmul,
        )
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.routing_statistics: dict[str, torch.Tensor] = {}
        self.init_truncation = config.init_truncation

    def init_weights(self, init_std: float, output_std: float, generator: Optional[torch.Generator] = None) -> None:
        normal_init_(self.router.weight, init_std, self.init_truncation, generator)
        self.experts.init_weights(init_std, output_std, generator, truncation=self.init_truncation)

    def active_parameter_count(self) -> int:
        """Parameters one token uses: the router, k experts' projections and their coefficients."""
        experts = self.experts
        per_expert = experts.in_proj[0].numel() + experts.out_proj[0].numel()
        coefficients = sum(parameter.numel() for parameter in experts.activation.parameters())
        if experts.per_expert_coefficients:
            coefficients = coefficients // experts.num_experts * self.top_k
        return self.router.weight.numel() + self.top_k * per_expert + coefficients

    def forward_flops_per_token(self) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add): the router and the k routed experts."""
        experts = self.experts
        per_expert = experts.in_proj[0].numel() + experts.out_proj[0].numel()
        return 2.0 * (self.router.weight.numel() + self.top_k * per_expert)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [T, d] → (logits [T, E], top_weights [T, k], both fp32 or wider; top_experts [T, k] int64)."""
        # The router runs in (at least) fp32 even under autocast: a bf16 softmax over 64 experts flips
        # top-k choices. Autocast is switched off so that F.linear really runs in that dtype.
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(tokens.to(dtype), self.router.weight.to(dtype))
        probabilities = logits.softmax(dim=-1)
        top_weights, top_experts = torch.topk(probabilities, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        self._record(logits, probabilities, top_experts)
        return logits, top_weights, top_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        _, top_weights, top_experts = self.route(tokens)
        output = self.dispatcher(tokens, top_experts, top_weights.to(tokens.dtype), self.experts)
        return output.to(x.dtype).reshape(shape)

    def _record(self, logits: torch.Tensor, probabilities: torch.Tensor, top_experts: torch.Tensor) -> None:
        num_tokens = logits.shape[0]
        counts = torch.zeros(self.num_experts, dtype=probabilities.dtype, device=logits.device)
        counts.scatter_add_(0, top_experts.reshape(-1), torch.ones_like(top_experts.reshape(-1), dtype=counts.dtype))
        assignment_fraction = counts / max(num_tokens * self.top_k, 1)
        mean_probability = probabilities.mean(dim=0)
        self.aux_losses = {
            "load_balancing": self.num_experts * torch.dot(assignment_fraction, mean_probability),
            "router_z": torch.logsumexp(logits, dim=-1).square().mean(),
        }
        log_probabilities = torch.log_softmax(logits.detach(), dim=-1)
        entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=-1).mean()
        self.routing_statistics = {"tokens_per_expert": counts.detach(), "router_entropy": entropy}

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


def validate_moe_model_config(config: ModelConfig) -> None:
    """Checks of `model.moe` that need the rest of `model` (the MoEConfig checks its own fields)."""
    moe = config.moe
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"model.moe.top_k {moe.top_k} is larger than model.moe.num_experts {moe.num_experts}")
    activation = ACTIVATIONS.get(config.activation)
    if moe.per_expert_coefficients and not getattr(activation, "has_coefficients", False):
        raise ConfigError(
            f"model.moe.per_expert_coefficients is set but model.activation {config.activation!r} has no "
            f"coefficients; use polynorm or polyrelu, or set per_expert_coefficients: false"
        )
    expert_width(config)


def moe_metrics_from_layers(layers: list[MoEFeedForward]) -> dict[str, float]:
    """Per layer: tokens per expert (min / max / coefficient of variation) and router entropy (nats)."""
    metrics: dict[str, float] = {}
    for index, layer in enumerate(layers):
        statistics = layer.routing_statistics
        if not statistics:
            continue
        counts = statistics["tokens_per_expert"].float()
        mean = counts.mean()
        coefficient_of_variation = counts.std(correction=0) / mean if mean > 0 else torch.zeros(())
        values = torch.stack([counts.min(), counts.max(), coefficient_of_variation, statistics["router_entropy"]])
        low, high, cv, entropy = values.tolist()  # one device-to-host copy per layer
        metrics[f"moe/layer_{index}/tokens_per_expert_min"] = low
        metrics[f"moe/layer_{index}/tokens_per_expert_max"] = high
        metrics[f"moe/layer_{index}/tokens_per_expert_cv"] = cv
        metrics[f"moe/layer_{index}/router_entropy"] = entropy
    return metrics
