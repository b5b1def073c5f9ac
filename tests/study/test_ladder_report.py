"""`compare` on a ladder whose runs' losses follow known laws (run folders written as finished runs leave
them, no training): the report's fit recovers the exponents, the multiplier says the better activation
needs less compute, the held-out error is small, and the downstream section says which sizes are at
chance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polycom_lm.models.flops import training_flops_per_token
from polycom_lm.study import runner
from polycom_lm.study.grid import main_runs
from polycom_lm.study.report import write_report
from polycom_lm.study.spec import load_study
from study_helpers import write_study

SIZES = {f"d{d}": {"model.d_model": d, "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_size": 2 * d}
         for d in (16, 32, 48, 64)}
E, LAWS = 2.0, {"swiglu": (30.0, 0.2), "polynorm": (24.0, 0.2)}  # polynorm: (30/24)^(1/0.2) = 3.05x less compute


def test_report_of_a_ladder_that_follows_known_laws(prepared_data, tmp_path):
    path = write_study(tmp_path, prepared_data, {"model.activation": ["swiglu", "polynorm"], "training.seed": [0, 1, 2]},
                       name="known", ladder={"sizes": SIZES, "budget": {"tokens_per_parameter": 1}, "warmup": {"steps": 1},
                                             "lr": {"rule": "fixed"}, "fit": {"bootstrap": 40}})
    spec = load_study(path)
    runs = main_runs(spec)
    rng = np.random.default_rng(0)
    for run in runs:
        training = run.config.training
        steps, tokens = training.max_steps, training.max_steps * training.global_batch_size * training.seq_len
        A, alpha = LAWS[run.config.model.activation]
        loss = (E + A * (training_flops_per_token(run.config.model, training.seq_len) * tokens) ** -alpha) \
            * np.exp(rng.normal(0, 0.002))
        at_chance = run.grid["size"] != "d64" or run.config.model.activation == "swiglu"
        rows = [{"kind": "train", "step": s, "tokens": tokens * s // steps, "loss": loss + 1 / s, "tokens_per_s": 1e4}
                for s in range(1, steps + 1)]
        rows += [{"kind": "eval", "step": steps, "tokens": tokens, "name": "heldout", "loss": float(loss)},
                 {"kind": "downstream", "step": steps, "tokens": tokens, "task": "piqa", "metric": "acc",
                  "value": 0.51 if at_chance else 0.70, "stderr": 0.02},
                 {"kind": "downstream", "step": steps, "tokens": tokens, "task": "lambada", "metric": "acc",
                  "value": 0.0, "stderr": 0.0}]
        run.output_dir.mkdir(parents=True)
        (run.output_dir / "config.yaml").write_text(run.config.to_yaml())
        (run.output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    runner.write_study_file(spec, runs, None)

    summary = write_report([spec.output_dir], tmp_path / "report")["ladder"]["known"]
    estimate, intervals = summary["estimate"], summary["intervals"]
    for activation, (_, alpha) in LAWS.items():
        assert estimate[f"alpha/{activation}"] == pytest.approx(alpha, rel=0.1)
    multipliers = [value for key, value in estimate.items() if key.startswith("M/polynorm/")]
    assert len(multipliers) == 25 and all(value == pytest.approx((30 / 24) ** 5, rel=0.15) for value in multipliers)
    assert all(intervals[key][0] > 1 for key in estimate if key.startswith("M/polynorm/"))
    low, high = intervals["delta_alpha/polynorm"]
    assert low <= 0 <= high  # equal exponents: no evidence the gap changes
    assert summary["held_out"]["size"] == "d64" and summary["held_out"]["max_abs_relative_error"] < 0.01

    report = (tmp_path / "report" / "report.md").read_text()
    assert "- size d16: every task at chance level" in report
    assert "- size d64: above chance: polynorm piqa/acc 0.700 (chance 0.5)." in report
    assert "no evidence that it changes (interval includes 0)" in report
    assert "How far the law can be trusted: one size step beyond the fitted range, to within" in report
    for figure in ("ladder_loss_compute.png", "ladder_multiplier.png", "ladder_residuals.png", "ladder_curves.png"):
        assert f"]({figure})" in report and (tmp_path / "report" / figure).stat().st_size > 5000
