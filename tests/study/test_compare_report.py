"""`compare` on synthetic metrics files: per-variant means and sample standard deviations over seeds, the
difference to SwiGLU with its standard error, non-empty PNG figures, and the flags and errors for runs that
cannot be compared like for like."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from polycom_lm.errors import ConfigError
from polycom_lm.study.report import write_report
from study_helpers import write_metrics

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
STEPS = 20


def _config(activation: str, seed: int, **model) -> dict:
    from polycom_lm.config import load_config

    raw = load_config(TINY).to_dict()
    raw["model"].update(activation=activation, **model)
    raw["training"].update(seed=seed, max_steps=STEPS, seq_len=32, global_batch_size=8)
    return raw


def _run(folder: Path, activation: str, seed: int, final_loss: float, speed: float, **model) -> Path:
    """A finished run whose last 10% of steps log `final_loss`, evaluated twice, with a downstream metric."""
    rows = []
    for step in range(1, STEPS + 1):
        loss = final_loss if step >= 18 else 9.0 - 0.25 * step
        row = {"kind": "train", "step": step, "tokens": step * 256, "loss": loss, "lr": 1e-3,
               "tokens_per_s": 5.0 if step == 1 else speed}
        if activation.startswith("poly"):
            for layer in (0, 1):
                for index, name in enumerate(("w0", "w1", "w2", "bias")):
                    row[f"coefficients/layers.{layer}.ffn.activation/{name}"] = 0.3 * index + 0.01 * step * (layer + 1)
        rows.append(row)
    for step, offset in ((10, 1.0), (20, 0.1)):
        rows.append({"kind": "eval", "step": step, "tokens": step * 256, "name": "heldout", "loss": final_loss + offset,
                     "perplexity": math.exp(final_loss + offset)})
        rows.append({"kind": "downstream", "step": step, "tokens": step * 256, "task": "piqa", "metric": "acc",
                     "value": 0.5 + 0.01 * step + (0.05 if activation == "polynorm" else 0.0)})
    path = folder / f"{activation}_seed{seed}"
    write_metrics(path, rows, _config(activation, seed, **model))
    return path


def test_report_gives_means_and_stds_over_seeds_and_differences_to_swiglu(tmp_path):
    runs = [
        _run(tmp_path, "swiglu", 0, 3.0, 100.0), _run(tmp_path, "swiglu", 1, 3.2, 104.0),
        _run(tmp_path, "polynorm", 0, 2.9, 90.0), _run(tmp_path, "polynorm", 1, 3.0, 92.0),
        _run(tmp_path, "polynorm", 2, 3.1, 94.0), _run(tmp_path, "relu", 0, 3.5, 120.0),
    ]
    summary = write_report(runs, tmp_path / "report")
    variants = summary["variants"]
    assert summary["baseline"] == "swiglu"
    assert variants["swiglu"]["train_loss"] == {"mean": pytest.approx(3.1), "std": pytest.approx(math.sqrt(0.02)), "n": 2}
    assert variants["polynorm"]["train_loss"] == {"mean": pytest.approx(3.0), "std": pytest.approx(0.1), "n": 3}
    assert variants["relu"]["train_loss"] == {"mean": pytest.approx(3.5), "std": None, "n": 1}
    assert variants["polynorm"]["validation"]["heldout"]["mean"] == pytest.approx(3.1)  # the last evaluation
    assert variants["polynorm"]["downstream"]["piqa/acc"]["mean"] == pytest.approx(0.75)
    assert variants["swiglu"]["tokens_per_s"]["mean"] == pytest.approx(102.0)  # the warm-up row left out
    assert variants["polynorm"]["parameters"]["mean"] == variants["swiglu"]["parameters"]["mean"] + 2 * 4  # coefficients
    delta = summary["differences"]["polynorm"]["train_loss"]
    assert delta["delta"] == pytest.approx(-0.1)
    assert delta["standard_error"] == pytest.approx(math.sqrt(0.1**2 / 3 + 0.02 / 2))
    assert summary["differences"]["relu"]["train_loss"] == {"delta": pytest.approx(0.4), "standard_error": None}
    assert summary["differences"]["polynorm"]["downstream/piqa/acc"]["delta"] == pytest.approx(0.05)

    report = (tmp_path / "report" / "report.md").read_text()
    assert "| polynorm | 3 |" in report and "3.0000 ± 0.1000" in report and "-0.1000 ± 0.1155" in report
    figures = ["train_loss.png", "validation.png", "downstream.png", "throughput.png", "coefficients_polynorm.png"]
    for name in figures:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
        assert f"]({name})" in report, name
    assert json.loads((tmp_path / "report" / "report.json").read_text())["baseline"] == "swiglu"
    assert not list((tmp_path / "report").glob(".compare-tmp-*"))


def test_runs_of_different_model_sizes_are_compared_but_flagged(tmp_path):
    small = _run(tmp_path / "a", "swiglu", 0, 3.0, 100.0)
    large = _run(tmp_path / "b", "polynorm", 0, 2.8, 50.0, d_model=128)
    summary = write_report([small, large], tmp_path / "report")
    assert any("different model sizes: model.d_model differs" in note for note in summary["notes"])
    assert "runs of different model sizes" in (tmp_path / "report" / "report.md").read_text()


def test_a_run_folder_without_metrics_is_a_one_line_error(tmp_path):
    good = _run(tmp_path, "swiglu", 0, 3.0, 100.0)
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "config.yaml").write_text((good / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="started has no metrics.jsonl: the run has not logged a step yet"):
        write_report([good, empty], tmp_path / "report")
    stray = tmp_path / "stray"
    stray.mkdir()
    with pytest.raises(ConfigError, match="stray is not a run folder .* nor a study folder"):
        write_report([stray], tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_a_study_run_without_metrics_is_a_note_and_foreign_reports_are_kept(tmp_path):
    study = tmp_path / "study"
    done = _run(study / "runs", "swiglu", 0, 3.0, 100.0)
    entries = [{"name": done.name, "output_dir": str(done), "grid": {"model.activation": "swiglu", "training.seed": 0}},
               {"name": "polynorm_seed0", "output_dir": str(study / "runs" / "polynorm_seed0"),
                "grid": {"model.activation": "polynorm", "training.seed": 0}}]
    (study / "study.json").write_text(json.dumps({"name": "s", "variant_keys": ["model.activation"], "runs": entries}))
    summary = write_report([study], study / "report")
    assert any("run polynorm_seed0 of study s is left out" in note for note in summary["notes"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "report.md").write_text("my notes\n")
    with pytest.raises(ConfigError, match="was not written by polycom-lm compare"):
        write_report([study], foreign)
    assert (foreign / "report.md").read_text() == "my notes\n"


def test_run_folders_of_one_activation_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path):
    runs = [_run(tmp_path / "a", "polynorm", 0, 3.0, 100.0, activation_order=2),
            _run(tmp_path / "b", "polynorm", 1, 3.2, 100.0, activation_order=2),
            _run(tmp_path / "c", "polynorm", 0, 2.9, 100.0, activation_order=3)]
    summary = write_report(runs, tmp_path / "report")
    assert sorted(summary["variants"]) == ["polynorm (activation_order=2)", "polynorm (activation_order=3)"]
    assert summary["variants"]["polynorm (activation_order=2)"]["train_loss"]["n"] == 2


def test_large_values_are_written_in_scientific_notation():
    from polycom_lm.study.statistics import Difference, Summary

    assert Summary(3.12341, 0.01, 3).text() == "3.1234 ± 0.0100"
    assert Summary(268607837.1, 39443586.3, 3).text() == "2.686e+08 ± 3.944e+07"
    assert Difference(56241228.5, 27928052.4).text() == "+5.624e+07 ± 2.793e+07"
    assert Difference(-0.03951, 0.0086).text() == "-0.0395 ± 0.0086"
    assert Summary(10296.4, 115.2, 3).text(0) == "10296 ± 115"


@pytest.mark.parametrize("count", [5, 12, 30])
def test_every_variant_of_a_study_gets_its_own_colour(count):
    """A ladder's 30 variants (6 sizes × 5 activations) once shared tab10's 10 colours, 3 bars each."""
    from polycom_lm.study.plots import colours

    palette = colours([f"variant-{index}" for index in range(count)])
    assert len({tuple(round(channel, 3) for channel in colour) for colour in palette.values()}) == count
