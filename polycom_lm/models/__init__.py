"""Model families. `build_model(model_config, device)` looks `model.family` up in `MODEL_FAMILIES`.

A family is a callable `(model_config) -> nn.Module` registered with `@MODEL_FAMILIES.register(name)`;
the module must define `init_weights(generator=None)` (see `polycom_lm.models.dense.Transformer`). A
family that only swaps the FFN subclasses `Transformer` and passes `ffn_factory(config, layer_index)`;
the FFN module it returns defines `init_weights(init_std, output_std, generator=None)` and, when not every
weight multiplies every token (MoE), `active_parameter_count()` and `forward_flops_per_token()`, which
`polycom_lm.models.flops` reads.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from polycom_lm.config import ModelConfig
from polycom_lm.registry import Registry

MODEL_FAMILIES = Registry("model family")

from polycom_lm.models.dense import Transformer, TransformerBlock  # noqa: E402
from polycom_lm.models.feedforward import FeedForward, ffn_width  # noqa: E402

MODEL_FAMILIES.register("dense")(Transformer)
from polycom_lm.models import moe  # noqa: E402,F401  registers the "moe" family


def build_model(model_config: ModelConfig, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Build and initialise the model `model_config.family` on `device` (default: torch's default device).

    The modules are always created on `meta` and then materialised with `to_empty` + `init_weights()`, so
    no memory or time goes into a throw-away default init, and a model built on `meta` (to count parameters
    or to shard with FSDP first) gets exactly the weights of a direct build once materialised. Seed with
    `torch.manual_seed` beforehand for reproducible weights.
    """
    family = MODEL_FAMILIES.get(model_config.family)
    target = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        model = family(model_config)
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights()
    return model


__all__ = [
    "MODEL_FAMILIES",
    "FeedForward",
    "Transformer",
    "TransformerBlock",
    "build_model",
    "ffn_width",
]
