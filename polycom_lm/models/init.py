"""The one weight-init draw every model module uses: N(0, std), optionally truncated.

`model.init_truncation` (None by default) truncates every normal init of the model at ± that many standard
deviations, as OLMo's `init_cutoff_factor` does (OLMoE-1B-7B: 3). `std` is the standard deviation of the
normal before truncation, as in OLMo and `torch.nn.init.trunc_normal_`. Without truncation the draw is
`nn.init.normal_`, so existing seeds give the weights they always gave.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def normal_init_(
    tensor: torch.Tensor, std: float, truncation: Optional[float] = None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Fill `tensor` in place with N(0, std²) draws, kept within ± truncation·std when `truncation` is set."""
    if truncation is None:
        return nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)
    bound = truncation * std
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-bound, b=bound, generator=generator)
