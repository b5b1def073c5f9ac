"""The MoE layer against independent references: transformers' OLMoE block, a float64 per-expert loop,
and the Switch / OLMoE auxiliary-loss formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polycom_lm.activations.kernels.reference import (
    polynomial_reference,
    polynorm_reference,
    polyprelu_reference,
    polyrelu_reference,
)
from polycom_lm.config import ModelConfig, MoEConfig, config_from_dict
from polycom_lm.errors import ConfigError
from polycom_lm.models.moe import MoEFeedForward, grouped_linear, grouped_mm_supported
from polycom_lm.models.moe_experts import _grouped_mm_applicable


def moe_config(activation: str = "swiglu", **moe) -> ModelConfig:
    settings = {"num_experts": 6, "top_k": 2, "expert_hidden_size": 8, **moe}
    return ModelConfig(d_model=16, n_heads=2, activation=activation, moe=MoEConfig(**settings))


def build_layer(config: ModelConfig, dtype=torch.float64, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(config).double()  # drawn in float64 whatever `dtype`: same weights for every dtype
    layer.init_weights(0.3, 0.3)
    if layer.experts.activation.has_coefficients:  # move coefficients off their init so each one matters
        with torch.no_grad():
            for parameter in layer.experts.activation.parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))
    return layer.to(dtype)


def loop_reference(layer: MoEFeedForward, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Token by token, expert by expert: out[t] = Σ_j p_j · expert_{e_j}(x[t]); an expert's PolyNorm row
    norm spans that expert's full width."""
    tokens = x.reshape(-1, x.shape[-1])
    probabilities = F.linear(tokens, layer.router.weight).softmax(-1)
    top_weights, top_experts = probabilities.topk(layer.top_k, dim=-1)
    if layer.norm_topk_prob:
        top_weights = top_weights / top_weights.sum(-1, keepdim=True)
    experts = layer.experts
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(layer.top_k):
            e = int(top_experts[t, j])
            hidden = experts.in_proj[e] @ tokens[t]
            if activation == "swiglu":
                gate, up = hidden.chunk(2)
                hidden = F.silu(gate) * up
            else:
                coefficients = experts.activation
                weight = coefficients.weight[e] if experts.per_expert_coefficients else coefficients.weight
                bias = coefficients.bias[e : e + 1] if experts.per_expert_coefficients else coefficients.bias
                formula = {
                    "polynorm": polynorm_reference,
                    "polyrelu": polyrelu_reference,
                    "poly": polynomial_reference,
                    "polyrelunorm": lambda h, w, b: polynorm_reference(h.clamp(min=0), w, b),
                    "polyprelu": lambda h, w, b: polyprelu_reference(h, w, b, coefficients.negative_slope),
                }[activation]
                hidden = formula(hidden[None], weight, bias)[0]
            out[t] += top_weights[t, j] * (experts.out_proj[e] @ hidden)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "activation, per_expert, matmul",
    [
        ("swiglu", False, "grouped_mm"),
        ("swiglu", False, "padded_bmm"),
        ("polynorm", False, "grouped_mm"),
        ("polynorm", True, "padded_bmm"),
        ("polyrelu", True, "grouped_mm"),
        ("poly", True, "padded_bmm"),
        ("polyrelunorm", False, "padded_bmm"),
        ("polyrelunorm", True, "padded_bmm"),
        ("polyprelu", False, "padded_bmm"),
    ],
)
def test_moe_layer_matches_per_expert_loop(activation, per_expert, matmul):
    """padded_bmm in float64 to 1e-10; grouped_mm (no float64 kernel) in float32 against the float64 loop."""
    if matmul == "grouped_mm" and not grouped_mm_supported(torch.device("cpu")):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    dtype, tolerance = (torch.float32, 2e-5) if matmul == "grouped_mm" else (torch.float64, 1e-9)
    config = moe_config(activation, per_expert_coefficients=per_expert, expert_matmul=matmul)
    layer = build_layer(config, dtype)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x_here = x.to(dtype, copy=True).requires_grad_()
    output = layer(x_here)
    reference_layer = build_layer(config, torch.float64)
    reference_x = x.clone().requires_grad_()
    expected = loop_reference(reference_layer, reference_x, activation)
    torch.testing.assert_close(output.double(), expected, rtol=tolerance, atol=tolerance)
    upstream = torch.randn_like(expected)
    (output * upstream.to(dtype)).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x_here.grad.double(), reference_x.grad, rtol=tolerance, atol=tolerance)
    for (name, parameter), reference in zip(layer.named_parameters(), reference_layer.parameters()):
        torch.testing.assert_close(parameter.grad.double(), reference.grad, rtol=tolerance, atol=tolerance, msg=name)


def test_grouped_mm_and_padded_bmm_agree_with_empty_experts():
    if not grouped_mm_supported(torch.device("cpu")):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 1])  # experts that receive nothing must not break either path
    rows = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(5, 4, 8, requires_grad=True)
    assert _grouped_mm_applicable(rows, weight)  # the grouped kernel really runs
    grouped = grouped_linear(rows, weight, counts, "grouped_mm")
    grouped.sum().backward()  # a stride-0 gradient, which raw _grouped_mm's backward rejects
    grads = rows.grad.clone(), weight.grad.clone()
    rows.grad = weight.grad = None
    padded = grouped_linear(rows, weight, counts, "padded_bmm")
    padded.sum().backward()
    expert_of_row = torch.repeat_interleave(torch.arange(5), counts)
    expected = torch.einsum("si,soi->so", rows, weight[expert_of_row])
    torch.testing.assert_close(grouped, expected)
    torch.testing.assert_close(padded, expected)
    torch.testing.assert_close(grads[0], rows.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("hf_implementation", ["eager", "grouped_mm"])
def test_moe_layer_matches_transformers_olmoe_sparse_moe_block(norm_topk_prob, hf_implementation):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    hf_config = OlmoeConfig(
        hidden_size=16, intermediate_size=8, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob
    )
    hf_config._experts_implementation = hf_implementation
    torch.manual_seed(0)
    hf_block = OlmoeSparseMoeBlock(hf_config)
    with torch.no_grad():
        for parameter in hf_block.parameters():
            parameter.normal_(0.0, 0.3)
    layer = MoEFeedForward(moe_config(norm_topk_prob=norm_topk_prob))
    with torch.no_grad():
        layer.router.weight.copy_(hf_block.gate.weight)
        layer.experts.in_proj.copy_(hf_block.experts.gate_up_proj)  # [E, 2I, H], [gate | up]
        layer.experts.out_proj.copy_(hf_block.experts.down_proj)  # [E, H, I]
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), hf_block(x), rtol=1e-5, atol=1e-5)


def test_aux_losses_match_switch_formula_and_transformers():
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    layer = build_layer(moe_config(), dtype=torch.float32)
    x = torch.randn(4, 6, 16)
    layer(x)
    logits = F.linear(x.reshape(-1, 16), layer.router.weight)
    # transformers counts the fraction of tokens per expert (summing to k): k times the assignment fraction.
    expected_balance = load_balancing_loss_func((logits,), num_experts=6, top_k=2) / 2
    torch.testing.assert_close(layer.aux_losses["load_balancing"], expected_balance)
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(layer.aux_losses["router_z"], expected_z)


def test_load_balancing_loss_is_one_when_perfectly_balanced_and_higher_when_collapsed():
    layer = build_layer(moe_config(num_experts=4, top_k=1), dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([10.0, 10.0, -10.0, -10.0])  # tokens choose by sign of x0
        layer.router.weight[:, 1] = torch.tensor([10.0, -10.0, 10.0, -10.0])
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    x[0, :, :2] = signs  # one token to each expert
    layer(x)
    torch.testing.assert_close(layer.aux_losses["load_balancing"].item(), 1.0, rtol=1e-6, atol=0)
    counts = layer.routing_statistics["tokens_per_expert"]
    assert counts.tolist() == [1.0, 1.0, 1.0, 1.0]
    layer(torch.zeros(1, 4, 16, dtype=torch.float64) + torch.tensor([1.0, 1.0] + [0.0] * 14, dtype=torch.float64))
    assert layer.aux_losses["load_balancing"].item() > 3.9  # all tokens on expert 0: E · 1 · ~1


def test_dropless_every_token_reaches_its_experts_under_total_collapse():
    config = moe_config("polynorm", num_experts=4, top_k=2)
    layer = build_layer(config)
    with torch.no_grad():  # every token prefers experts 0 and 1: no capacity limit may drop any of them
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 0] = 50.0
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    x[..., 0] = 1.0
    torch.testing.assert_close(layer(x), loop_reference(layer, x, "polynorm"), rtol=1e-10, atol=1e-10)
    assert layer.routing_statistics["tokens_per_expert"].tolist() == [9.0, 9.0, 0.0, 0.0]


def test_bad_moe_configs_fail_at_config_time_naming_the_key():
    with pytest.raises(ConfigError, match="model.moe.top_k 9 is larger than model.moe.num_experts 8"):
        config_from_dict({"model": {"family": "moe", "moe": {"num_experts": 8, "top_k": 9}}})
    with pytest.raises(ConfigError, match="per_expert_coefficients.*'swiglu' has no coefficients"):
        MoEFeedForward(moe_config("swiglu", per_expert_coefficients=True))
    with pytest.raises(ConfigError, match="model.moe.expert_matmul"):
        config_from_dict({"model": {"moe": {"expert_matmul": "cutlass"}}})


def test_per_expert_coefficients_refuse_polyprelu_naming_the_valid_activations():
    with pytest.raises(ConfigError, match="per_expert_coefficients needs a PolyCom activation .*polyrelunorm"):
        MoEFeedForward(moe_config("polyprelu", per_expert_coefficients=True))
