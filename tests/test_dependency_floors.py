"""Dependency floors: every installed direct dependency satisfies the lower bound pyproject.toml declares,
and the transformers floor is one with the packed-expert OLMoE layout the conversion relies on.
`scripts/check_dependency_floors.sh` runs these tests (and the conversions') with every floor installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared_floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement.split("#")[0].strip())
        assert match, f"{requirement!r}: every dependency declares a floor as name>=version"
        floors[match.group(1)] = Version(match.group(2))
    return floors


@pytest.mark.parametrize("name, floor", sorted(declared_floors().items()))
def test_installed_version_is_at_least_the_declared_floor(name, floor):
    installed = Version(metadata.version(name))
    assert installed.release >= floor.release, f"{name} {installed} is below the declared floor {floor}"


def test_the_transformers_floor_has_the_packed_expert_layout():
    assert declared_floors()["transformers"] >= Version("5.0")
    transformers = pytest.importorskip("transformers")
    config = transformers.OlmoeConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_experts=4, num_experts_per_tok=2)
    state = transformers.OlmoeForCausalLM(config).state_dict()
    # One [E, 2·I, H] tensor per layer, [gate | up]: what `hf_olmoe` copies into our experts' in_proj.
    assert tuple(state["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 16, 16)
    assert tuple(state["model.layers.0.mlp.experts.down_proj"].shape) == (4, 16, 8)


def test_the_training_install_leaves_the_dev_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.split(r"[<>=\s\[]", requirement)[0].lower() for requirement in project["dependencies"]}
    dev = {re.split(r"[<>=\s\[]", requirement)[0].lower() for requirement in project["optional-dependencies"]["dev"]}
    assert not core & {"deepspeed", "triton", "tensorboard", "pytest"}
    assert {"deepspeed", "triton", "tensorboard", "pytest"} <= dev
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert 'dev) target=".[dev]"' in setup and 'train) target="."' in setup
    assert "bash scripts/setup_env.sh train" in (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "bash scripts/setup_env.sh dev" in (ROOT / "scripts" / "test.sh").read_text()


@pytest.mark.parametrize("override, package", [("logging.tensorboard=true", "tensorboard"),
                                               ("distributed.backend=deepspeed", "deepspeed")])
def test_a_feature_whose_extra_is_missing_is_a_one_line_error(monkeypatch, override, package):
    import importlib.util

    from polycom_lm.config import load_config
    from polycom_lm.errors import ConfigError
    from polycom_lm.train.validation import validate_config

    config = load_config(ROOT / "configs" / "experiments" / "quickstart" / "polynorm.yaml", [override])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"needs the {package} package.*pip install 'polycom_lm\[{package}\]'"):
        validate_config(config, 1)
