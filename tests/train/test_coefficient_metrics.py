"""The logged PolyCom coefficients: every parameter of a coefficient-bearing module, by name."""

from __future__ import annotations

import torch
from torch import nn

from polycom_lm.activations import build_activation
from polycom_lm.train.metrics import coefficient_metrics


def test_polyprelu_logs_its_slope_beside_weights_and_bias():
    model = nn.ModuleDict({"act": build_activation("polyprelu", order=2), "relu": build_activation("relu")})
    with torch.no_grad():
        model["act"].weight.copy_(torch.tensor([0.5, -1.5]))
        model["act"].bias.fill_(0.125)
        model["act"].negative_slope.fill_(-0.75)
    assert coefficient_metrics(model) == {
        "coefficients/act/w0": 0.5,
        "coefficients/act/w1": -1.5,
        "coefficients/act/bias": 0.125,
        "coefficients/act/negative_slope": -0.75,
    }
