"""Bad input to `polycom-lm train`: one-line `error: ...`, exit status 2, nothing written or overwritten."""

from __future__ import annotations

import shutil

import pytest

from polycom_lm.cli import main
from polycom_lm.train import run_training
from trainer_test_helpers import load, run_config, snapshot, train_in_process, write_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=-0.001", "optimizer.lr=-0.001 is invalid; it must be > 0"),
        ("training.global_batch_size=6", "not divisible by training.micro_batch_size=4 x 1 data-parallel ranks"),
        ("training.seq_len=128", "training.seq_len=128 exceeds the model's maximum model.max_seq_len=64"),
        ("model.activation=swish", "unknown activation 'swish'"),
        ("schedule.warmup_steps=10", "schedule.warmup_steps=10 exceeds the run's 4 steps"),
        ("training.precision=fp16", "training.precision"),
        ("distributed.backend=horovod", "unknown distributed backend 'horovod'"),
    ],
)
def test_invalid_values_fail_with_one_line_before_writing(capsys, prepared_data, tmp_path, override, message):
    config_path = write_config(tmp_path / "config.yaml", run_config(prepared_data, tmp_path / "run"))
    code, error = train_in_process(capsys, config_path, override)
    assert code == 2
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_fails_without_creating_the_run(capsys, prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run")
    raw["data"]["train"] = [{"source": str(tmp_path / "no_such_folder")}]
    code, error = train_in_process(capsys, write_config(tmp_path / "config.yaml", raw))
    assert code == 2 and "no_such_folder" in error
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoints_are_reported_and_left_alone(capsys, prepared_data, tmp_path):
    raw = run_config(prepared_data, tmp_path / "run", max_steps=2, eval_every_steps=0)
    config_path = write_config(tmp_path / "config.yaml", raw)
    run_training(load(raw))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    more = ["--resume", "training.max_steps=3"]  # an override after --resume is not taken for a path

    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path / "run", pristine)
    (checkpoint / "trainer_state.json").write_text("{not json")
    before = snapshot(tmp_path / "run")
    code, error = train_in_process(capsys, config_path, *more)
    assert code == 2 and "step_2/trainer_state.json: corrupt trainer state" in error
    assert snapshot(tmp_path / "run") == before

    shutil.rmtree(tmp_path / "run")
    shutil.copytree(pristine, tmp_path / "run")
    shard = next(checkpoint.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = snapshot(tmp_path / "run")
    code, error = train_in_process(capsys, config_path, *more)
    assert code == 2 and "cannot load model/optimizer state" in error and str(checkpoint) in error
    assert snapshot(tmp_path / "run") == before

    code, error = train_in_process(capsys, config_path, "--resume", str(checkpoint / "trainer_state.json"))
    assert code == 2 and "not a checkpoint" in error

    code, error = train_in_process(capsys, config_path, "--resume", str(tmp_path / "nowhere"))
    assert code == 2 and "not a checkpoint" in error

    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_99\n")
    code, error = train_in_process(capsys, config_path)
    assert code == 2 and "not a complete checkpoint" in error


def test_resume_without_a_run_and_resume_with_overwrite_are_refused(capsys, prepared_data, tmp_path):
    config_path = write_config(tmp_path / "config.yaml", run_config(prepared_data, tmp_path / "run"))
    code, error = train_in_process(capsys, config_path, "--resume")
    assert code == 2 and "holds no run to resume" in error
    with pytest.raises(SystemExit):  # argparse: mutually exclusive options
        main(["train", str(config_path), "--resume", "--overwrite"])


def test_checkpoint_metadata_is_never_unpickled_beyond_checkpoint_classes(capsys, prepared_data, tmp_path):
    import os
    import pickle

    raw = run_config(prepared_data, tmp_path / "run", max_steps=1, eval_every_steps=0)
    config_path = write_config(tmp_path / "config.yaml", raw)
    run_training(load(raw))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "run" / "checkpoints" / "step_1" / ".metadata").write_bytes(pickle.dumps(Payload()))
    code, error = train_in_process(capsys, config_path, "--resume", "training.max_steps=2")
    assert code == 2 and "not a valid checkpoint metadata file (refusing to load posix.system)" in error
    assert not marker.exists()
