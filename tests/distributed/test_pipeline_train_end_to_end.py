"""`polycom-lm train` with `distributed.pp=2` under torchrun reproduces the single-process run (training
losses and gradient norms, validation loss, zero-shot task rows, every layer's PolyNorm coefficients in
metrics.jsonl); its checkpoint resumes on one process with the uninterrupted losses and consolidates into
the plain model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_harness import REPOSITORY
from test_launch_and_train_end_to_end import assert_resumes_on_one_process, launch, numbers, write

pytestmark = pytest.mark.slow


def run_config(prepared_data, output_dir: Path) -> dict:
    from eval_helpers import write_eval_data

    eval_data = output_dir.parent / "eval_data"
    if not eval_data.exists():
        write_eval_data(eval_data)
    return {
        "base": str(REPOSITORY / "configs" / "model" / "tiny.yaml"),
        "model": {"activation": "polynorm", "max_seq_len": 256, "d_model": 32, "ffn_hidden_size": 64, "n_layers": 4},
        "data": {"train": [{"source": str(prepared_data["train"])}],
                 "validation": [{"name": "heldout", "source": str(prepared_data["validation"])}]},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "training": {"output_dir": str(output_dir), "max_steps": 4, "seq_len": 16, "global_batch_size": 8,
                     "micro_batch_size": 2, "log_every_steps": 1, "eval_every_steps": 2, "save_every_steps": 2,
                     "seed": 3},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
        "evaluation": {"max_tokens": 256, "downstream": {"tasks": ["piqa", "lambada"], "every_steps": 2,
                                                         "limit": 4, "data_dir": str(eval_data)}},
    }


def rows(metrics: Path, kind: str) -> list[dict]:
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    return [row for row in read_metrics(metrics) if row["kind"] == kind]


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory) -> dict[str, Path]:
    from polycom_lm.config import load_config
    from polycom_lm.train import run_training

    root = tmp_path_factory.mktemp("pipeline_runs")
    run_training(load_config(write(root / "single.yaml", run_config(prepared_data, root / "single"))))
    config = write(root / "pp2.yaml", run_config(prepared_data, root / "pp2"))
    completed = launch("torchrun_single_node.sh", str(config), "distributed.pp=2", "distributed.pp_schedule=1f1b",
                       NPROC_PER_NODE="2")
    assert completed.returncode == 0, f"pp2:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return {"root": root, "single": root / "single", "pp2": root / "pp2"}


def test_pp2_training_reproduces_the_single_process_run(runs):
    expected = numbers(runs["single"] / "metrics.jsonl")
    measured = numbers(runs["pp2"] / "metrics.jsonl")
    assert sorted(measured) == [1, 2, 3, 4]
    for step, (loss, grad_norm) in expected.items():
        assert measured[step][0] == pytest.approx(loss, rel=1e-6), f"step {step} loss"
        assert measured[step][1] == pytest.approx(grad_norm, rel=1e-5), f"step {step} grad norm"


def test_pp2_validation_and_coefficients_match_the_single_process_run(runs):
    single, pp2 = (rows(runs[name] / "metrics.jsonl", "eval") for name in ("single", "pp2"))
    assert [row["step"] for row in pp2] == [2, 4]
    for expected, measured in zip(single, pp2):
        assert measured["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert measured["eval_tokens"] == expected["eval_tokens"]
    single_train, pp2_train = (rows(runs[name] / "metrics.jsonl", "train")[-1] for name in ("single", "pp2"))
    coefficients = sorted(key for key in single_train if key.startswith("coefficients/"))
    assert len(coefficients) == 16 and coefficients == sorted(k for k in pp2_train if k.startswith("coefficients/"))
    for key in coefficients:
        assert pp2_train[key] == pytest.approx(single_train[key], rel=1e-5, abs=1e-7), key


def test_pp2_downstream_rows_match_the_single_process_run(runs):
    single, pp2 = ({(row["step"], row["task"], row["metric"]): row["value"]
                    for row in rows(runs[name] / "metrics.jsonl", "downstream")} for name in ("single", "pp2"))
    assert sorted({key[0] for key in pp2}) == [2, 4] and len(pp2) == 8
    assert pp2 == pytest.approx(single, rel=1e-5)


def test_pp2_checkpoint_resumes_on_one_process_with_the_uninterrupted_losses(runs, prepared_data):
    root = runs["root"]
    assert_resumes_on_one_process(run_config(prepared_data, root / "from_pp2"), root / "from_pp2.yaml",
                                  runs["pp2"] / "checkpoints" / "step_2", numbers(runs["single"] / "metrics.jsonl"),
                                  relative=1e-6, norm_relative=1e-5)


def test_pp2_checkpoint_consolidates_and_loads_like_the_single_process_one(runs, tmp_path):
    from safetensors.torch import load_file

    from polycom_lm.cli import main
    from polycom_lm.pretrained.loading import load_model

    states = {}
    for name in ("single", "pp2"):
        out = tmp_path / f"{name}.safetensors"
        assert main(["checkpoint", "consolidate", str(runs[name]), "--step", "4", "--out", str(out)]) == 0
        states[name] = load_file(str(out))
    assert sorted(states["pp2"]) == sorted(states["single"])
    for key, tensor in states["single"].items():
        assert (states["pp2"][key] - tensor).abs().max().item() < 1e-5, key
    loaded = load_model(str(runs["pp2"]))  # what `eval`, `export` and `generate` read
    assert loaded.step == 4
    for key, tensor in loaded.model.state_dict().items():
        if key in states["single"]:
            assert (tensor - states["single"][key]).abs().max().item() < 1e-5, key
