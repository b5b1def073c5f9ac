"""The quickstart configs: valid, one per activation, matched parameters, and the script that runs one."""

from __future__ import annotations

import math
import subprocess

import pytest

from polycom_lm.config import load_config
from polycom_lm.models.flops import parameter_counts
from polycom_lm.train.validation import validate_config
from trainer_test_helpers import REPO, cli_environment, train_rows

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


def test_quickstart_script_trains_polynorm_with_its_config(prepared_data, tmp_path):
    """`bash scripts/quickstart.sh` itself (environment check, then `polycom-lm train` on the PolyNorm
    quickstart config), shrunk by overrides to a tiny model on the test corpus for 3 steps."""
    output = tmp_path / "run"
    overrides = [
        f"data.train=[{{source: '{prepared_data['train']}'}}]",
        f"data.validation=[{{name: heldout, source: '{prepared_data['validation']}'}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "model.ffn_hidden_size=128", "training.seq_len=32", "training.global_batch_size=8",
        "training.micro_batch_size=4", "training.max_steps=3", "schedule.warmup_steps=1", "training.log_every_steps=1",
        "training.eval_every_steps=0", "training.save_every_steps=0", f"training.output_dir={output}",
        "evaluation.max_tokens=512", "logging.wandb_mode=disabled", "--no-progress",
    ]
    completed = subprocess.run(
        ["bash", str(REPO / "scripts" / "quickstart.sh"), *overrides],
        cwd=REPO, env=cli_environment(), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = load_config(output / "config.yaml")
    assert saved.model.activation == "polynorm" and saved.training.compile  # the quickstart's own settings
    rows = train_rows(output / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert "coefficients/layers.0.ffn.activation/w0" in rows[-1]  # PolyNorm's coefficients are logged
    assert (output / "checkpoints" / "step_3" / "trainer_state.json").is_file()
    assert "validation set 'heldout': loss" in completed.stdout
