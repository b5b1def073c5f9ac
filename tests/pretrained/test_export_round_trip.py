"""`export` for every activation, dense and MoE: transformers loads the folder (Llama, OLMoE, or our
remote-code PolycomForCausalLM) and its logits equal ours; loading the folder back is exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from export_helpers import small_tokenizer, trained_looking_model
from polycom_lm.models import build_model
from polycom_lm.pretrained.export import export_model
from polycom_lm.pretrained.loading import LoadedModel, load_model

ACTIVATIONS = ["relu", "gelu", "swiglu", "polyrelu", "polynorm"]
EXPECTED_ARCHITECTURE = {("dense", "swiglu"): "LlamaForCausalLM", ("moe", "swiglu"): "OlmoeForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("family", ["dense", "moe"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_exported_logits_equal_ours_and_loading_back_is_exact(tokenizer, tmp_path, family, activation):
    from transformers import AutoModelForCausalLM

    model = trained_looking_model(family, activation)
    result = export_model(LoadedModel(model, model.config, tokenizer, tmp_path / "run", "run", 5, 640), tmp_path / "out")
    assert result.architecture == EXPECTED_ARCHITECTURE.get((family, activation), "PolycomForCausalLM")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [result.architecture]
    assert ("auto_map" in config) == (result.architecture == "PolycomForCausalLM")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == result.architecture
    tokens = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert ours.abs().max() > 1.0  # logits of order one, so 1e-5 is a real bound
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = load_model(tmp_path / "out")
    assert back.step == 5 and back.tokens == 640 and back.model_config == model.config
    for (name, tensor), other in zip(model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(tensor, other), name


def test_per_expert_coefficients_tied_embeddings_and_head_qk_norm_export(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_looking_model("moe", "polynorm", tie_embeddings=True)
    model.config.moe.per_expert_coefficients = True
    torch.manual_seed(1)
    model = build_model(model.config).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.experts.activation.weight.normal_(0.3, 0.2)
    export_model(LoadedModel(model, model.config, tokenizer, tmp_path, "run"), tmp_path / "out")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=0, atol=1e-5)


def test_large_models_are_sharded_with_an_index_and_bf16_is_written_as_bf16(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_looking_model("dense", "polyrelu")
    export_model(LoadedModel(model, model.config, tokenizer, tmp_path, "run"), tmp_path / "out",
                 dtype=torch.bfloat16, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / name).is_file() for name in shards)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert next(hf_model.parameters()).dtype == torch.bfloat16
    tokens = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        expected = model.to(torch.bfloat16).float()(tokens)
        got = hf_model.float()(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_the_shipped_modeling_code_runs_without_polycom_lm(tokenizer, tmp_path):
    model = trained_looking_model("moe", "polynorm")
    export_model(LoadedModel(model, model.config, tokenizer, tmp_path, "run"), tmp_path / "out")
    tokens = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        torch.save(model(tokens), tmp_path / "expected.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys
sys.modules["polycom_lm"] = None  # any import of polycom_lm now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True, dtype=torch.float32)
logits = model(torch.load({str(tmp_path / 'tokens.pt')!r})).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=1e-5)
print("ok")
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0 and process.stdout.strip().endswith("ok"), process.stderr[-2000:]
