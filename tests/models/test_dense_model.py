"""The dense Transformer: shapes for every registered activation, causality, packed documents, the FFN
width rule, ffn_factory, errors, and the no-torch.distributed rule."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import polycom_lm.models
from polycom_lm.activations import ACTIVATIONS
from polycom_lm.config import ModelConfig, load_config
from polycom_lm.errors import ConfigError
from polycom_lm.models import MODEL_FAMILIES, FeedForward, Transformer, build_model, ffn_width

TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def tiny_config(**overrides) -> ModelConfig:
    config = load_config(TINY).model
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_registered_activation_builds_and_trains_one_step(activation):
    config = tiny_config(activation=activation)
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    width = ffn_width(config)
    in_features = model.layers[0].ffn.in_proj.out_features
    assert in_features == (2 * width if ACTIVATIONS.get(activation).gated else width)
    input_ids = torch.randint(0, config.vocab_size, (2, 16))
    logits = model(input_ids)
    assert logits.shape == (2, 16, config.vocab_size) and logits.dtype == torch.float32
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_logits_at_a_position_ignore_later_tokens():
    torch.manual_seed(0)
    model = build_model(tiny_config(n_kv_heads=2), device="cpu")
    input_ids = torch.randint(0, 512, (1, 12))
    changed = input_ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 512
    with torch.no_grad():
        before, after = model(input_ids), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=0)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_packed_documents_give_the_logits_of_separate_sequences():
    """With document_ids, each document of a packed row sees only itself, so its logits equal those of
    the document run alone from position 0 (RoPE is relative: the shifted positions do not matter)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(n_kv_heads=2, qk_norm=True), device="cpu").double()
    first, second = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 9))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        together = model(packed, document_ids)
        torch.testing.assert_close(together[:, :7], model(first), rtol=0, atol=1e-10)
        torch.testing.assert_close(together[:, 7:], model(second), rtol=0, atol=1e-5)
        # Without the document mask the second document does see the first.
        assert not torch.allclose(model(packed)[:, 7:], model(second), atol=1e-3)
    with pytest.raises(ValueError, match="document_ids shape"):
        model(packed, document_ids[:, :-1])


def test_bf16_autocast_forward_is_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(tiny_config(activation="polynorm"), device="cpu")
    input_ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        reference = model(input_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(input_ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_ffn_width_follows_the_papers_parameter_matching():
    config = ModelConfig(ffn_hidden_size=5504, activation="swiglu")
    assert ffn_width(config) == 5504
    for activation in ("relu", "gelu", "polyrelu", "polynorm"):
        config.activation = activation
        assert ffn_width(config) == 8256
    config.ffn_width = 1000
    assert ffn_width(config) == 1000


def test_ffn_width_rejects_a_non_integer_three_halves():
    with pytest.raises(ConfigError, match="ffn_hidden_size 1375.*not an integer"):
        ffn_width(ModelConfig(ffn_hidden_size=1375, activation="polynorm"))


def test_gated_and_non_gated_ffns_have_equal_parameters():
    counts = {}
    for activation in ("swiglu", "relu", "polynorm"):
        ffn = FeedForward(tiny_config(activation=activation))
        counts[activation] = sum(p.numel() for p in ffn.parameters() if p.dim() == 2)
    assert len(set(counts.values())) == 1, counts


def test_ffn_factory_replaces_every_dense_ffn():
    class Doubling(nn.Module):
        def __init__(self, config, layer_index):
            super().__init__()
            self.layer_index = layer_index
            self.scale = nn.Parameter(torch.empty(config.d_model))

        def init_weights(self, init_std, output_std, generator=None):
            nn.init.constant_(self.scale, 2.0)

        def forward(self, x):
            return x * self.scale

    model = Transformer(tiny_config(), ffn_factory=Doubling)
    assert [layer.ffn.layer_index for layer in model.layers] == [0, 1]
    assert all((layer.ffn.scale == 2.0).all() for layer in model.layers)
    assert model(torch.randint(0, 512, (1, 4))).shape == (1, 4, 512)


def test_sequence_longer_than_max_seq_len_is_a_config_error():
    model = build_model(tiny_config(max_seq_len=8), device="cpu")
    with pytest.raises(ConfigError, match="sequence length 9 exceeds model.max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_shapes_and_names_are_config_errors():
    with pytest.raises(ConfigError, match="n_heads 4 must be a multiple of model.n_kv_heads 3"):
        build_model(tiny_config(n_kv_heads=3), device="meta")
    with pytest.raises(ConfigError, match="registered: .*dense"):
        build_model(tiny_config(family="dense2"), device="meta")
    with pytest.raises(ConfigError, match="registered: .*polynorm"):
        build_model(tiny_config(activation="polynorn"), device="meta")


def test_dense_is_a_registered_family():
    assert MODEL_FAMILIES.get("dense") is Transformer


def test_models_package_never_imports_torch_distributed():
    package = Path(polycom_lm.models.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            if any(name == "torch.distributed" or name.startswith("torch.distributed.") for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_forward_and_backward_compile_as_one_graph():
    """No graph breaks (dynamo with the eager backend, so no C++ compile): masks, RoPE and PolyNorm trace."""
    torch.manual_seed(0)
    model = build_model(tiny_config(activation="polynorm", n_kv_heads=2), device="cpu")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    input_ids = torch.randint(0, 512, (2, 16))
    document_ids = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    torch.testing.assert_close(compiled(input_ids, document_ids), model(input_ids, document_ids))
    compiled(input_ids).sum().backward()
    assert model.layers[0].ffn.activation.weight.grad is not None


def test_an_odd_head_size_or_empty_model_is_a_config_error():
    with pytest.raises(ConfigError, match="head size 9 .* must be even"):
        build_model(tiny_config(d_model=36), device="meta")
    with pytest.raises(ConfigError, match="model.n_layers must be positive"):
        build_model(tiny_config(n_layers=0), device="meta")
