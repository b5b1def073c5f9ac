"""The activation registry: names, flags, builders, shapes and parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from polycom_lm.activations import ACTIVATIONS, build_activation, build_activation_from_config
from polycom_lm.config import ModelConfig
from polycom_lm.errors import ConfigError

ALL_NAMES = {
    "relu", "gelu", "swiglu", "polyrelu", "polynorm", "squared_relu", "geglu", "poly", "polyprelu", "polyrelunorm",
}
GATED = {"swiglu", "geglu"}
NORMALIZED = {"polynorm", "polyrelunorm"}
COEFFICIENTS = {"polyrelu", "polynorm", "poly", "polyprelu", "polyrelunorm"}
# Parameters beyond the polynomial's `weight` and `bias`, with their init.
EXTRA_PARAMETERS = {"polyprelu": {"negative_slope": 0.25}}


def test_every_paper_activation_is_registered_with_its_flags():
    assert ALL_NAMES <= set(ACTIVATIONS)
    for name in ALL_NAMES:
        cls = ACTIVATIONS[name]
        assert cls.gated is (name in GATED), name
        assert cls.normalizes_over_width is (name in NORMALIZED), name
        assert cls.has_coefficients is (name in COEFFICIENTS), name


def test_unknown_activation_error_lists_every_registered_name():
    with pytest.raises(ConfigError) as info:
        build_activation("swishglu")
    message = str(info.value)
    assert "swishglu" in message and "did you mean 'swiglu'" in message
    for name in ALL_NAMES:
        assert name in message


def test_gated_activations_split_gate_then_up():
    x = torch.randn(3, 5, 8)
    gate, up = x[..., :4], x[..., 4:]
    torch.testing.assert_close(build_activation("swiglu")(x), F.silu(gate) * up)
    torch.testing.assert_close(build_activation("geglu")(x), F.gelu(gate) * up)
    with pytest.raises(ValueError, match="even"):
        build_activation("swiglu")(torch.randn(2, 3))


def test_elementwise_activations_match_their_formulas():
    x = torch.randn(4, 6)
    torch.testing.assert_close(build_activation("relu")(x), x.clamp(min=0))
    torch.testing.assert_close(build_activation("gelu")(x), 0.5 * x * (1 + torch.erf(x / 2**0.5)))
    torch.testing.assert_close(build_activation("squared_relu")(x), x.clamp(min=0) ** 2)


@pytest.mark.parametrize("name", sorted(n for n, cls in ACTIVATIONS.items() if cls.has_coefficients))
@pytest.mark.parametrize("order", [1, 3, 4])
def test_polycom_parameters_start_at_one_over_order_and_zero_bias(name, order):
    module = build_activation(name, order=order)
    params = dict(module.named_parameters())
    extra = EXTRA_PARAMETERS.get(name, {})
    assert set(params) == {"weight", "bias", *extra}
    torch.testing.assert_close(module.weight.detach(), torch.full((order,), 1.0 / order))
    torch.testing.assert_close(module.bias.detach(), torch.zeros(1))
    for parameter_name, initial in extra.items():
        with torch.no_grad():
            params[parameter_name].fill_(initial + 1.0)
        module.reset_parameters()
        torch.testing.assert_close(params[parameter_name].detach(), torch.full((1,), initial))
    assert module(torch.randn(2, 5)).shape == (2, 5)


def test_build_from_config_passes_order_and_impl_only_where_taken():
    config = dataclasses.replace(ModelConfig(), activation="polynorm", activation_order=2, activation_impl="reference")
    module = build_activation_from_config(config)
    assert module.order == 2 and module.impl == "reference" and module.weight.shape == (2,)
    relu = build_activation_from_config(dataclasses.replace(config, activation="relu"))
    assert type(relu).__name__ == "ReLU"


@pytest.mark.parametrize("bad", [{"order": 0}, {"order": 2.5}, {"impl": "fastest"}])
def test_bad_polycom_arguments_raise_config_errors(bad):
    with pytest.raises(ConfigError):
        build_activation("polynorm", **bad)


def test_activations_build_on_meta_device():
    with torch.device("meta"):
        module = build_activation("polynorm")
    assert module.weight.is_meta


def test_auto_impl_resolution():
    from polycom_lm.activations.kernels.select import COMPILED_MIN_ELEMENTS, compile_available, resolve_impl

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("reference", cpu) == "reference"
    assert resolve_impl("auto", cpu, numel=10) == "fused"  # not worth a compilation
    assert resolve_impl("auto", cuda) == "fused"
    if compile_available("cpu"):
        assert resolve_impl("auto", cpu, numel=COMPILED_MIN_ELEMENTS) == "compiled"
    with pytest.raises(ValueError):
        resolve_impl("fastest", cpu)
