"""A tiny ladder for real: 3 sizes × 2 activations × 2 seeds of the tiny model, a few steps each, through
`polycom-lm study` (which writes the report) and `polycom-lm compare`; and the one-line error of a ladder
that cannot be fitted. The runs train in this process (the runner's `train` subprocess is replaced by the
same CLI call; tests/study/test_study_runs.py covers the subprocesses), to keep 12 runs within seconds."""

from __future__ import annotations

import json

import pytest

from polycom_lm.cli import main as cli
from polycom_lm.study import runner
from polycom_lm.study.grid import main_runs
from polycom_lm.study.spec import load_study
from study_helpers import write_study


SIZES = {
    "xs": {"model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 32},
    "s": {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 64},
    "m": {"model.d_model": 48, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 96},
}


def _ladder(sizes: dict) -> dict:
    return {"sizes": sizes, "budget": {"tokens_per_parameter": 0.15}, "warmup": {"steps": 1},
            "lr": {"rule": "power", "exponent": -0.3333, "reference_parameters": 20000}, "fit": {"bootstrap": 20}}


def test_tiny_ladder_runs_through_study_and_compare(prepared_data, tmp_path, capsys, runner_trains_in_process):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"], "training.seed": [0, 1]},
                       name="tiny_ladder", ladder=_ladder(SIZES),
                       training={"eval_every_steps": 0, "save_every_steps": 100, "log_every_steps": 1})
    spec = load_study(path)
    assert cli(["study", str(path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "size-xs_activation-swiglu_seed-0" in dry and "12 runs" in dry
    assert cli(["study", str(path)]) == 0
    assert len(runner_trains_in_process) == 12
    report = (spec.output_dir / "report" / "report.md").read_text()
    for heading in ("## Scaling ladder (tiny_ladder)", "### Fit: L(C) = E + A·C^(−α)",
                    "### Effective compute multiplier against swiglu", "### Held-out check",
                    "## Results at size xs", "## Difference to the swiglu baseline at size m"):
        assert heading in report, heading
    for figure in ("ladder_loss_compute.png", "ladder_residuals.png", "ladder_curves.png"):
        assert (spec.output_dir / "report" / figure).stat().st_size > 5000
    summary = json.loads((spec.output_dir / "report" / "report.json").read_text())["ladder"]["tiny_ladder"]
    assert set(summary["fits"]["compute"]["groups"]) == {"swiglu", "polynorm"}
    assert 0.01 <= summary["estimate"]["alpha/polynorm"] <= 2.0
    assert summary["held_out"]["size"] == "m"
    study = json.loads((spec.output_dir / "study.json").read_text())
    steps = {run["grid"]["size"]: run["config"]["training"]["max_steps"] for run in study["runs"]}
    assert steps["xs"] < steps["s"] < steps["m"]  # budgets grow with N

    out = tmp_path / "compared"
    assert cli(["compare", str(spec.output_dir), "--out", str(out)]) == 0
    assert "### Fit: L(C)" in (out / "report.md").read_text()


def test_compare_on_a_ladder_that_cannot_be_fitted_is_one_error_line(prepared_data, tmp_path, capsys):
    """Two sizes give each activation two compute budgets; L(C) needs three. The runs' folders are written
    as a finished run leaves them (config.yaml, metrics.jsonl), without training."""
    two = {name: SIZES[name] for name in ("xs", "s")}
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"], "training.seed": [0, 1]},
                       name="short_ladder", ladder=_ladder(two))
    spec = load_study(path)
    runs = main_runs(spec)
    for index, run in enumerate(runs):
        steps = run.config.training.max_steps
        rows = [{"kind": "train", "step": step, "tokens": 256 * step, "loss": 6.0 - 0.1 * step, "tokens_per_s": 1e4}
                for step in range(1, steps + 1)]
        rows.append({"kind": "eval", "step": steps, "tokens": 256 * steps, "name": "heldout", "loss": 5.5 - 0.01 * index})
        run.output_dir.mkdir(parents=True)
        (run.output_dir / "config.yaml").write_text(run.config.to_yaml())
        (run.output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    runner.write_study_file(spec, runs, None)
    assert cli(["compare", str(spec.output_dir), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ladder short_ladder: cannot fit L(C)")
    assert "2 distinct compute budgets (runs at xs, s)" in error and "at least 3" in error
    assert not (tmp_path / "report" / "report.md").exists()  # nothing half-written
