"""The quickstart configs: valid, one per activation, matched parameters, and the script that runs one."""

from __future__ import annotations

import subprocess

import pytest

from polycom_lm.config import load_config
from polycom_lm.models.flops import parameter_counts
from polycom_lm.train.validation import validate_config
from trainer_test_helpers import REPO

QUICKSTART = REPO / "configs" / "experiments" / "quickstart"
ACTIVATIONS = ["relu", "gelu", "swiglu", "polyrelu", "polynorm"]


def test_quickstart_configs_differ_only_in_activation_at_matched_parameters():
    configs = {name: load_config(QUICKSTART / f"{name}.yaml") for name in ACTIVATIONS}
    reference = configs["swiglu"].to_dict()
    totals = {}
    for name, config in configs.items():
        validate_config(config, world_size=1)
        assert config.model.activation == name
        assert config.training.output_dir == f"runs/quickstart/{name}"
        assert config.data.train[0].source == "builtin:pydoc"
        raw = config.to_dict()
        raw["model"]["activation"] = reference["model"]["activation"]
        raw["training"]["output_dir"] = reference["training"]["output_dir"]
        assert raw == reference, name
        totals[name] = parameter_counts(config.model)["total"]
    assert max(totals.values()) / min(totals.values()) == pytest.approx(1.0, abs=1e-3)


def test_quickstart_script_sets_up_the_environment_and_trains_polynorm():
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "quickstart.sh")]).returncode == 0
    assert "bash scripts/setup_env.sh" in script
    assert "polycom-lm train configs/experiments/quickstart/polynorm.yaml" in script
