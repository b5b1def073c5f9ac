"""Bytes kept for backward, measured with saved-tensor hooks: the fused PolyCom paths keep only x (and
PolyNorm's r inverse norms per row), less than SwiGLU at matched parameters."""

from __future__ import annotations

import pytest
import torch

from polycom_lm.activations import build_activation
from polycom_lm.activations.saved_memory import saved_tensor_bytes

ROWS, WIDTH = 64, 96  # a non-gated width; the matched SwiGLU width is 2/3 of it


def bytes_of(module, x):
    return saved_tensor_bytes(lambda: module(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["polynorm", "polyrelunorm"])
def test_fused_polynorm_keeps_only_input_and_inverse_norms(name, dtype):
    module = build_activation(name, impl="fused")
    x = torch.randn(ROWS, WIDTH, dtype=dtype, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    coefficient_bytes = module.weight.numel() * 4
    inverse_norm_bytes = ROWS * 3 * 4  # fp32 statistics, also for bf16 input
    assert bytes_of(module, x) == input_bytes + inverse_norm_bytes + coefficient_bytes


@pytest.mark.parametrize("name", ["polyrelu", "poly", "polyprelu"])
def test_fused_polynomials_keep_only_input(name):
    module = build_activation(name, impl="fused")
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    slope_bytes = 4 if name == "polyprelu" else 0  # the slope [1] is a parameter too
    assert bytes_of(module, x) == x.numel() * 4 + module.weight.numel() * 4 + slope_bytes


def test_plain_autograd_polynorm_keeps_several_times_more():
    x = torch.randn(ROWS, WIDTH, requires_grad=True)
    reference = bytes_of(build_activation("polynorm", impl="reference"), x)
    fused = bytes_of(build_activation("polynorm", impl="fused"), x)
    assert reference >= 5 * x.numel() * 4
    assert fused * 4 < reference


def test_fused_polynorm_keeps_less_than_swiglu_at_matched_parameters():
    swiglu_width = WIDTH * 2 // 3
    polynorm = bytes_of(build_activation("polynorm", impl="fused"), torch.randn(ROWS, WIDTH, requires_grad=True))
    swiglu = bytes_of(build_activation("swiglu"), torch.randn(ROWS, 2 * swiglu_width, requires_grad=True))
    assert polynorm < swiglu
