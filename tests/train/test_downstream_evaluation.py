"""`evaluation.downstream` in training: rows `kind: downstream` every `every_steps` and at the final step,
in metrics.jsonl and TensorBoard, equal to `polycom-lm eval` of the final checkpoint; bad task names and
missing task files fail before the run writes anything."""

from __future__ import annotations

import pytest

from eval_helpers import write_eval_data
from polycom_lm.errors import ConfigError, DataError
from polycom_lm.eval import get_task
from polycom_lm.eval.runner import evaluate
from polycom_lm.pretrained.loading import load_model
from polycom_lm.train import run_training
from trainer_test_helpers import load, run_config


def downstream_config(prepared_data, tmp_path, **downstream):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=5, save_every_steps=5, eval_every_steps=0)
    raw["model"]["max_seq_len"] = 256
    raw["logging"]["tensorboard"] = True
    raw["evaluation"]["downstream"] = {"tasks": ["piqa", "lambada"], "every_steps": 2, "limit": 4,
                                       "data_dir": str(write_eval_data(tmp_path / "eval_data")), **downstream}
    return load(raw)


def test_downstream_rows_are_logged_every_n_steps_and_at_the_end(prepared_data, tmp_path):
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    config = downstream_config(prepared_data, tmp_path)
    result = run_training(config)
    rows = [row for row in read_metrics(result.metrics_path) if row["kind"] == "downstream"]
    assert sorted({row["step"] for row in rows}) == [2, 4, 5]
    assert {(row["task"], row["metric"]) for row in rows} == {("piqa", "acc"), ("piqa", "acc_norm"),
                                                              ("lambada", "perplexity"), ("lambada", "acc")}
    assert all(row["examples"] == 4 and row["tokens"] == row["step"] * 8 * 32 and "stderr" in row for row in rows)
    # The final rows are what `polycom-lm eval` gives on the final checkpoint.
    loaded = load_model(result.output_dir)
    data_dir = tmp_path / "eval_data"
    tasks = {get_task(name): get_task(name).examples(data_dir, 4) for name in ("piqa", "lambada")}
    expected = {(r.task, metric): value for r in evaluate(loaded.model, loaded.tokenizer, tasks, max_length=256).results
                for metric, value in r.metrics.items()}
    final = {(row["task"], row["metric"]): row["value"] for row in rows if row["step"] == 5}
    assert final == pytest.approx(expected, rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.output_dir / "tensorboard")).Reload()
    assert [event.step for event in events.Scalars("downstream/piqa/acc")] == [2, 4, 5]


@pytest.mark.parametrize("downstream, error, message", [
    ({"tasks": ["piqa", "hellaswog"]}, ConfigError, "unknown task 'hellaswog'"),
    ({"tasks": ["copa"]}, DataError, "llmfoundry_icl/copa.jsonl not found"),
])
def test_bad_tasks_fail_before_the_run_writes_anything(prepared_data, tmp_path, downstream, error, message):
    config = downstream_config(prepared_data, tmp_path, **downstream)
    if downstream["tasks"] == ["copa"]:
        (tmp_path / "eval_data" / "llmfoundry_icl" / "copa.jsonl").unlink()
    with pytest.raises(error, match=message):
        run_training(config)
    assert not (tmp_path / "run").exists()
