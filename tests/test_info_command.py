"""`polycom-lm info`: JSON on stdout, overrides, one-line errors, and the dense_1b parameter matching."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polycom_lm.cli import main

ROOT = Path(__file__).resolve().parents[1]
DENSE_1B = ROOT / "configs" / "experiments" / "dense_1b"
ACTIVATIONS = ("relu", "gelu", "swiglu", "polyrelu", "polynorm")


def info(capsys, *argv):
    assert main(["info", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_five_dense_1b_experiments_match_parameters_within_a_tenth_of_a_percent(capsys):
    reports = {activation: info(capsys, DENSE_1B / f"{activation}.yaml") for activation in ACTIVATIONS}
    for activation, report in reports.items():
        assert report["activation"] == activation
        assert report["experiment"] == f"dense_1b_{activation}"
        assert report["seq_len"] == 4096
        assert report["ffn_width"] == (5504 if activation == "swiglu" else 8256)
    for key in ("total_parameters", "non_embedding_parameters", "active_parameters", "training_flops_per_token"):
        values = [report[key] for report in reports.values()]
        assert max(values) / min(values) - 1 < 1e-3, (key, values)
    assert 1.3e9 < reports["polynorm"]["total_parameters"] < 1.5e9


def test_overrides_change_the_reported_model(capsys):
    base = info(capsys, ROOT / "configs" / "model" / "tiny.yaml")
    wider = info(capsys, ROOT / "configs" / "model" / "tiny.yaml", "model.n_layers=4", "training.seq_len=64")
    assert wider["total_parameters"] > base["total_parameters"]
    assert wider["seq_len"] == 64
    assert set(base) >= {"total_parameters", "non_embedding_parameters", "active_parameters",
                         "training_flops_per_token", "ffn_width", "activation"}


def test_a_bad_config_is_a_one_line_error_with_exit_status_2(capsys, tmp_path):
    assert main(["info", str(DENSE_1B / "polynorm.yaml"), "model.activation=polynorn"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "polynorm" in error and error.count("\n") == 1
    assert main(["info", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_console_script_entry_point_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "polycom_lm.cli", "info", str(DENSE_1B / "polynorm.yaml")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["activation"] == "polynorm"


def test_moe_configs_report_expert_width_and_fewer_active_parameters(capsys):
    report = info(capsys, ROOT / "configs" / "model" / "tiny.yaml", "model.family=moe", "model.moe.num_experts=8",
                  "model.moe.top_k=2", "model.moe.expert_hidden_size=64")
    assert report["expert_width"] == 64 and "ffn_width" not in report
    assert report["active_parameters"] < report["total_parameters"]


@pytest.mark.parametrize("activation", ["swiglu", "polynorm", "relu"])
def test_flops_by_part_count_every_ffn_matrix_attention_and_the_head(capsys, activation):
    """Against the formulas written out: a gated FFN's three d×w matrices equal a non-gated one's two d×(3w/2)."""
    report = info(capsys, ROOT / "configs" / "model" / "tiny.yaml", f"model.activation={activation}", "training.seq_len=64")
    d, layers, heads, vocab, gated_width, seq = 64, 2, 4, 512, 128, 64  # configs/model/tiny.yaml
    parts = report["training_flops_per_token_by_part"]
    assert parts["ffn"] == 6 * layers * 3 * d * gated_width  # forward 2 per multiply-add, × 3 with backward
    assert parts["attention_projections"] == 6 * layers * 4 * d * d
    assert parts["attention_scores"] == 6 * layers * heads * (d // heads) * seq
    assert parts["lm_head"] == 6 * d * vocab
    assert sum(parts.values()) == report["training_flops_per_token"]
