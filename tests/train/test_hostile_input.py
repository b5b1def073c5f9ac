"""Every bad input to `polycom-lm train` found by a deliberate probe is one line `error: ...`, exit 2, and
leaves nothing half-written: config values that would crash or make every step NaN, hostile YAML, corrupt
run-folder files, tampered checkpoints and shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from polycom_lm.train import run_training
from trainer_test_helpers import load, run_config, snapshot, train_in_process, train_rows, write_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.init_std=-1", "model.init_std=-1.0 is invalid; it must be > 0"),
        ("model.init_std=.nan", "model.init_std=nan is invalid"),
        ("model.ffn_hidden_size=-6", "model.ffn_hidden_size=-6 is invalid; it must be > 0"),
        ("model.norm_eps=-1", "model.norm_eps=-1.0 is invalid; it must be > 0"),
        ("model.rope_theta=0", "model.rope_theta=0.0 is invalid; it must be > 0"),
        ("training.seed=-1", "training.seed=-1 is invalid; it must be an integer in [0, 2**63)"),
        ("training.seed=1e23", "training.seed=99999999999999991611392 is invalid"),
        ("training.max_consecutive_skips=0", "training.max_consecutive_skips=0 is invalid"),
    ],
)
def test_values_that_would_crash_or_train_on_nan_are_refused(capsys, prepared_data, tmp_path, override, message):
    config_path = write_config(tmp_path / "config.yaml", run_config(prepared_data, tmp_path / "run"))
    code, error = train_in_process(capsys, config_path, override)
    assert code == 2 and error.startswith("error: ") and message in error, error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: &a [*a]\n", "a YAML alias refers to itself"),
        ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)),
         "expands to more than 100,000 values"),
        ("x: " + "[" * 200 + "]" * 200 + "\n", "nested"),
    ],
    ids=["recursive-alias", "billion-laughs", "deep-nesting"],
)
def test_hostile_yaml_is_one_line(capsys, tmp_path, text, message):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(text)
    code, error = train_in_process(capsys, config_path)
    assert code == 2 and error.startswith("error: ") and message in error, error


@pytest.fixture
def finished_run(prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=2, eval_every_steps=0, save_every_steps=1)
    run_training(load(raw))
    return write_config(tmp_path / "config.yaml", raw), tmp_path / "run"


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda run: (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00binary"),
         "latest is not a text file naming a checkpoint"),
        (lambda run: _append(run / "metrics.jsonl", b"\xff\xfe garbage\n" + b'{"kind": "train", "step": 9}\n'),
         "metrics.jsonl line 4 is not a metrics row"),
        (lambda run: _append(run / "metrics.jsonl", b"[1, 2, 3]\n" + b'{"kind": "train", "step": 9}\n'),
         "metrics.jsonl line 4 is not a metrics row"),
        (lambda run: _append(run / "metrics.jsonl", b'{"kind": "train", "step": "two"}\n{"step": 9}\n'),
         "metrics.jsonl line 4 is not a metrics row"),
        (lambda run: _edit_state(run / "checkpoints" / "step_2", step=-100),
         "corrupt trainer state (step=-100; it must be >= 0)"),
        (lambda run: _edit_state(run / "checkpoints" / "step_2", consumed_samples=-5),
         "corrupt trainer state (consumed_samples=-5; it must be >= 0)"),
        (lambda run: _edit_state(run / "checkpoints" / "step_2", step="2"),
         "corrupt trainer state ('step' is '2', not an integer)"),
        (lambda run: (run / "checkpoints" / "step_2" / "rng" / "rank_0.pt").unlink(),
         "rng/rank_0.pt is missing: the checkpoint is incomplete"),
    ],
    ids=["binary-latest", "binary-metrics-row", "list-metrics-row", "typed-metrics-row", "negative-step",
         "negative-consumed-samples", "string-step", "missing-rng-file"],
)
def test_corrupt_run_folder_files_are_one_line_and_left_alone(capsys, finished_run, corrupt, message):
    config_path, run = finished_run
    corrupt(run)
    before = snapshot(run)
    code, error = train_in_process(capsys, config_path, "training.max_steps=3", "--resume")
    assert code == 2 and error.startswith("error: ") and message in error, error
    assert snapshot(run) == before


def _append(path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def _edit_state(folder, **values) -> None:
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(values)
    path.write_text(json.dumps(state))


def test_a_torn_last_metrics_line_from_a_killed_writer_is_ignored(capsys, finished_run):
    config_path, run = finished_run
    _append(run / "metrics.jsonl", b'{"kind": "train", "st')
    code, _ = train_in_process(capsys, config_path, "training.max_steps=3", "--resume")
    assert code == 0
    assert [row["step"] for row in train_rows(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_config_yaml_that_is_a_folder_is_one_line(capsys, prepared_data, tmp_path):
    config_path = write_config(tmp_path / "config.yaml", run_config(prepared_data, tmp_path / "run"))
    (tmp_path / "run" / "config.yaml").mkdir(parents=True)
    code, error = train_in_process(capsys, config_path)
    assert code == 2 and "config.yaml is not a file" in error


# ------------------------------------------------------------------------------------------- shards


@pytest.fixture
def own_shards(prepared_data, tmp_path):
    """Copies of the test corpus's shards (so they can be damaged) and a config that trains on them."""
    train, validation = tmp_path / "train", tmp_path / "validation"
    shutil.copytree(prepared_data["train"], train)
    shutil.copytree(prepared_data["validation"], validation)
    raw = run_config({"train": train, "validation": validation}, tmp_path / "run", max_steps=1, eval_every_steps=0)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    return write_config(tmp_path / "config.yaml", raw), train


@pytest.mark.parametrize("damage", ["zeroed", "bit-flipped"])
def test_a_damaged_shard_of_the_right_size_is_refused(capsys, own_shards, damage):
    config_path, train = own_shards
    tokens = train / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    if damage == "zeroed":
        data[:] = bytes(len(data))
    else:
        data[len(data) // 2] ^= 0x01
    tokens.write_bytes(bytes(data))
    code, error = train_in_process(capsys, config_path)
    assert code == 2 and "tokens.bin does not match its manifest" in error


def test_shards_are_hashed_once_per_file_version(own_shards, tmp_path):
    from polycom_lm.data.shards import verify_shard

    _, train = own_shards
    cache = tmp_path / "verify_cache"
    assert verify_shard(train, cache) is True  # hashed
    assert verify_shard(train, cache) is False  # the cache vouches for the same file
    (train / "tokens.bin").touch()  # a new modification time: hashed again
    assert verify_shard(train, cache) is True


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_step_one(capsys, own_shards, tmp_path):
    config_path, train = own_shards
    manifest = json.loads((train / "manifest.json").read_text())
    manifest.update(max_token_id=600, vocab_size=1000)  # the tokens file is untouched, so its digest holds
    (train / "manifest.json").write_text(json.dumps(manifest))
    code, error = train_in_process(capsys, config_path)
    assert code == 2 and "token ids go up to 600 but model.vocab_size is 512" in error
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- non-finite


def test_skip_escalates_after_max_consecutive_skips(capsys, prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=30, eval_every_steps=0, save_every_steps=0,
                     log_every_steps=100, max_consecutive_skips=4)
    raw["optimizer"]["lr"] = 1e30
    code, error = train_in_process(capsys, write_config(tmp_path / "config.yaml", raw))
    assert code == 2 and "the 4th in a row (training.max_consecutive_skips=4)" in error, error
    rows = train_rows(tmp_path / "run" / "metrics.jsonl")
    stopped_at = rows[-1]["step"]
    assert stopped_at < 30 and rows[-1]["skipped_steps"] >= 4
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at}").is_dir()  # the last good state


def test_stop_mode_logs_the_non_finite_step_before_stopping(capsys, prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=30, eval_every_steps=0, save_every_steps=0,
                     log_every_steps=100, on_nonfinite="stop")
    raw["optimizer"]["lr"] = 1e30
    code, error = train_in_process(capsys, write_config(tmp_path / "config.yaml", raw))
    assert code == 2 and "non-finite loss or gradient norm at step" in error
    last = train_rows(tmp_path / "run" / "metrics.jsonl")[-1]
    assert not np.isfinite(float(last["loss"])) or not np.isfinite(float(last["grad_norm"]))
