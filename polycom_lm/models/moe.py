"""The `moe` model family: the dense decoder with every FFN replaced by an OLMoE-style MoE layer.

`MoETransformer` is `Transformer(config, ffn_factory=MoEFeedForward)` plus what the trainer reads after
each forward:
- `last_aux_losses: dict[str, Tensor]`: `load_balancing` (× `moe.lb_loss_weight`) and `router_z`
  (× `moe.z_loss_weight`), each the mean over layers of the layer's loss, already weighted; the trainer
  adds them to the LM loss and logs each one. A term whose weight is 0 is left out.
- `moe_metrics() -> dict[str, float]`: per layer tokens per expert (min / max / coefficient of variation)
  and router entropy, from the last forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from polycom_lm.config import ModelConfig
from polycom_lm.models import MODEL_FAMILIES
from polycom_lm.models.dense import Transformer
from polycom_lm.models.lm_head import DEFAULT_CHUNK_TOKENS
from polycom_lm.models.moe_experts import GroupedExperts, grouped_linear, grouped_mm_supported
from polycom_lm.models.moe_layer import (
    LocalDispatcher,
    MoEFeedForward,
    combine_sorted,
    expert_width,
    moe_metrics_from_layers,
    sort_by_expert,
    validate_moe_model_config,
)

__all__ = [
    "GroupedExperts",
    "LocalDispatcher",
    "MoEFeedForward",
    "MoETransformer",
    "combine_sorted",
    "expert_width",
    "grouped_linear",
    "grouped_mm_supported",
    "sort_by_expert",
    "validate_moe_model_config",
]


def _moe_ffn(config: ModelConfig, layer_index: int) -> MoEFeedForward:
    return MoEFeedForward(config)


@MODEL_FAMILIES.register("moe")
class MoETransformer(Transformer):
    """Decoder-only MoE language model: forward(input_ids [batch, seq], document_ids=None) → logits
    [batch, seq, vocab_size] (or, with `targets`, the summed cross-entropy); see `Transformer`."""

    def __init__(self, config: ModelConfig):
        validate_moe_model_config(config)
        super().__init__(config, ffn_factory=_moe_ffn)
        self.last_aux_losses: dict[str, torch.Tensor] = {}

    def moe_layers(self) -> list[MoEFeedForward]:
        return [layer.ffn for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        document_ids: Optional[torch.Tensor] = None,
        targets: Optional[torch.Tensor] = None,
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> torch.Tensor:
        out = super().forward(input_ids, document_ids, targets, loss_chunk_tokens)
        self.last_aux_losses = self.weighted_aux_losses()
        return out

    def weighted_aux_losses(self) -> dict[str, torch.Tensor]:
        """The last forward's auxiliary losses, averaged over layers and weighted (see module docstring)."""
        weights = {"load_balancing": self.config.moe.lb_loss_weight, "router_z": self.config.moe.z_loss_weight}
        layers = self.moe_layers()
        losses: dict[str, torch.Tensor] = {}
        for name, weight in weights.items():
            if weight > 0 and all(name in layer.aux_losses for layer in layers):
                losses[name] = weight * torch.stack([layer.aux_losses[name] for layer in layers]).mean()
        return losses

    def moe_metrics(self) -> dict[str, float]:
        return moe_metrics_from_layers(self.moe_layers())
