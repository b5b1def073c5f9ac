"""End-to-end runs of the trainer in this process: outputs, metrics, checkpoints, automatic resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polycom_lm.config import load_config
from polycom_lm.errors import ConfigError
from polycom_lm.train import run_training
from trainer_test_helpers import load, run_config, train_rows


def test_run_writes_config_metrics_coefficients_evaluation_and_checkpoints(prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=4, save_every_steps=2, keep_last_checkpoints=1)
    result = run_training(load(raw))
    output = tmp_path / "run"
    assert result.final_step == 4
    assert (output / "config.yaml").is_file()
    assert load_config(output / "config.yaml") == load(raw)  # the fully resolved config, loadable as is
    rows = train_rows(output / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s"):
            assert key in row and math.isfinite(row[key]), key
        assert row["tokens"] == row["step"] * 8 * 32
        # PolyNorm coefficients of both layers, every logged step.
        for layer in (0, 1):
            for name in ("w0", "w1", "w2", "bias"):
                assert f"coefficients/layers.{layer}.ffn.activation/{name}" in row
        assert any(key.startswith("memory/") for key in row)
    assert 0 < rows[-1]["mfu"] < 1
    evaluations = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in evaluations if row["kind"] == "eval"]
    assert [(row["step"], row["name"]) for row in evaluations] == [(2, "heldout"), (4, "heldout")]
    assert all(row["perplexity"] == pytest.approx(math.exp(row["loss"])) for row in evaluations)
    assert result.final_evaluation == evaluations[-1:]
    checkpoints = output / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_4"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_4"]  # keep_last_checkpoints=1
    state = json.loads((checkpoints / "step_4" / "trainer_state.json").read_text())
    assert state == {"step": 4, "tokens": 4 * 8 * 32, "consumed_samples": 32, "skipped_steps": 0, "world_size": 1}
    assert (checkpoints / "step_4" / "rng" / "rank_0.pt").is_file()
    # The run keeps its tokenizer, so eval / export / generate find it wherever the folder is moved.
    from polycom_lm.data import load_tokenizer

    kept = load_tokenizer(output / "tokenizer")
    assert kept.identity == load_tokenizer(prepared_data["train"] / "tokenizer").identity


def test_same_config_resumes_and_changed_config_needs_resume_or_overwrite(prepared_data, tmp_path):
    output = tmp_path / "run"
    raw = run_config(prepared_data, output, max_steps=2, eval_every_steps=0)
    run_training(load(raw))
    again = run_training(load(raw))  # same run: resumes at step 2, nothing left to do
    assert again.final_step == 2
    assert [row["step"] for row in train_rows(output / "metrics.jsonl")] == [1, 2]

    longer = load(raw, ["training.max_steps=3"])
    before = sorted(p.name for p in output.rglob("*"))
    with pytest.raises(ConfigError, match=r"different config \(differs in training.max_steps\).*--resume.*--overwrite"):
        run_training(longer)
    assert sorted(p.name for p in output.rglob("*")) == before  # refused: nothing touched

    resumed = run_training(longer, resume="latest")
    assert resumed.final_step == 3
    assert [row["step"] for row in train_rows(output / "metrics.jsonl")] == [1, 2, 3]
    assert (output / "config.before_step_2.yaml").is_file()

    fresh = run_training(load(raw, ["training.max_steps=1"]), overwrite=True)
    assert fresh.final_step == 1
    assert [row["step"] for row in train_rows(output / "metrics.jsonl")] == [1]
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_1"


def test_bf16_autocast_block_checkpointing_and_token_units_run(prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=2, precision="bf16",
                     activation_checkpointing="block", eval_every_steps=0, save_every_steps=0)
    raw["schedule"] = {"name": "wsd", "units": "tokens", "warmup_tokens": 256, "decay_tokens": 256}
    result = run_training(load(raw))
    rows = train_rows(result.metrics_path)
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert rows[0]["lr"] == pytest.approx(3e-3)  # warmup of one step's tokens, then stable
    assert rows[1]["lr"] == pytest.approx(3e-3 * 0.1)  # decayed over the last 256 tokens to lr_min_ratio


@pytest.mark.parametrize("mode, attention_runs, activation_runs", [
    ("none", 1, 1), ("activation", 1, 2), ("block", 2, 2),
])
def test_activation_checkpointing_recomputes_what_it_says(prepared_data, tmp_path, monkeypatch, mode,
                                                          attention_runs, activation_runs):
    """Per micro-batch and layer: `block` runs attention and the activation again in backward,
    `activation` only the activation, `none` neither (counted through the trainer's own step)."""
    from polycom_lm.activations.polycom import PolyNorm
    from polycom_lm.data import PackedDataset
    from polycom_lm.models.attention import Attention
    from polycom_lm.train import build_trainer

    calls = {"attention": 0, "activation": 0}

    def counting(kind, forward):
        def run(self, *args, **kwargs):
            calls[kind] += 1
            return forward(self, *args, **kwargs)
        return run

    monkeypatch.setattr(Attention, "forward", counting("attention", Attention.forward))
    monkeypatch.setattr(PolyNorm, "forward", counting("activation", PolyNorm.forward))
    raw = run_config(prepared_data, tmp_path / "run", max_steps=1, activation_checkpointing=mode)
    trainer = build_trainer(load(raw), PackedDataset([(prepared_data["train"], 1.0)], 32, seed=1))
    trainer.train_step()
    forwards = 2 * 2  # 2 micro-batches x 2 layers
    assert calls == {"attention": attention_runs * forwards, "activation": activation_runs * forwards}


def test_resuming_from_an_earlier_own_checkpoint_replays_exactly_and_keeps_later_ones(prepared_data, tmp_path):
    output = tmp_path / "run"
    raw = run_config(prepared_data, output, max_steps=4, save_every_steps=1, eval_every_steps=0,
                     keep_last_checkpoints=3)
    run_training(load(raw))
    original = [(row["step"], row["loss"], row["grad_norm"]) for row in train_rows(output / "metrics.jsonl")]
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_2", "step_3", "step_4"]

    (checkpoints / ".tmp-step_9").mkdir()  # an interrupted write from some crash: cleaned up on start
    run_training(load(raw), resume=str(checkpoints / "step_2"))
    replayed = [(row["step"], row["loss"], row["grad_norm"]) for row in train_rows(output / "metrics.jsonl")]
    assert replayed == original  # rows after step 2 were dropped and reproduced bitwise
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_2", "step_3", "step_4"]
    assert (checkpoints / "latest").read_text().strip() == "step_4"

    other = load(run_config(prepared_data, tmp_path / "other", max_steps=2, eval_every_steps=0))
    run_training(other)
    with pytest.raises(ConfigError, match="already holds another run; continue into a new training.output_dir"):
        run_training(other, resume=str(checkpoints / "step_2"))


def test_bf16_parameters_without_fp32_master_weights_train(prepared_data, tmp_path):
    from polycom_lm.train import build_trainer
    from polycom_lm.data import PackedDataset

    raw = run_config(prepared_data, tmp_path / "run", max_steps=2, precision="bf16", param_dtype="bf16")
    config = load(raw)
    trainer = build_trainer(config, PackedDataset([(prepared_data["train"], 1.0)], 32, seed=1))
    model = trainer.engine.unwrapped_model()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    before = model.layers[0].ffn.in_proj.weight.detach().clone()
    results = [trainer.train_step() for _ in range(2)]
    assert all(result.finite for result in results)
    assert not torch.equal(model.layers[0].ffn.in_proj.weight, before)
