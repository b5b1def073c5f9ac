"""No checkpoint can run code when it is loaded: a crafted checkpoint whose payload would create a file is
refused with a one-line error, and the file does not appear, on every loading path (resume under each
engine, `checkpoint consolidate`)."""

from __future__ import annotations

import fractions
import json
import shutil
from pathlib import Path

import pytest
import torch

from crafted import Payload, plant_in_dcp_byte_item, point_storage_outside
from polycom_lm.cli import main
from polycom_lm.errors import CheckpointError
from polycom_lm.train import run_training
from trainer_test_helpers import load, run_config, write_config


def _cli(capsys, *arguments) -> tuple[int, list[str]]:
    code = main(list(arguments))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def finished_runs(prepared_data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{backend: (config path, run folder)} of a 1-step run with one checkpoint, for ddp and fsdp."""
    runs = {}
    for backend in ("ddp", "fsdp"):
        root = tmp_path_factory.mktemp(backend)
        raw = run_config(prepared_data, root / "run", max_steps=1, eval_every_steps=0)
        raw["distributed"] = {"backend": backend}
        run_training(load(raw))
        runs[backend] = (write_config(root / "config.yaml", raw), root / "run")
    return runs


def _fresh_copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_resume_refuses_a_dcp_byte_item_that_would_run_code(capsys, finished_runs, tmp_path, backend):
    config_path, run = finished_runs[backend]
    run = _fresh_copy(run, tmp_path)
    raw = load_raw(config_path, output_dir=run)
    marker = tmp_path / "pwned"
    plant_in_dcp_byte_item(run / "checkpoints" / "step_1", marker)
    code, error = _cli(capsys, "train", str(write_config(tmp_path / "c.yaml", raw)), "--resume",
                       "training.max_steps=2", "--no-progress")
    assert code == 2
    assert error[-1].startswith("error: ") and "refusing to unpickle" in error[-1] and "posix.system" in error[-1]
    assert not marker.exists()
    assert not (run / "checkpoints" / "step_2").exists()


def load_raw(config_path: Path, output_dir: Path) -> dict:
    import yaml

    raw = yaml.safe_load(config_path.read_text())
    raw["training"]["output_dir"] = str(output_dir)
    return raw


def test_consolidate_refuses_a_dcp_tensor_entry_that_would_run_code(capsys, finished_runs, tmp_path):
    """consolidate reads only the `model.*` tensors: point one of them at a payload."""
    _, run = finished_runs["ddp"]
    run = _fresh_copy(run, tmp_path)
    marker = tmp_path / "pwned"
    plant_in_dcp_byte_item(run / "checkpoints" / "step_1", marker, key="model.tok_embeddings.weight")
    out = tmp_path / "model.safetensors"
    code, error = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out))
    assert code == 2 and len(error) == 1 and "posix.system" in error[0] and str(run) in error[0]
    assert not marker.exists() and not out.exists()


def test_storage_entries_outside_the_checkpoint_folder_are_refused(capsys, finished_runs, tmp_path):
    _, run = finished_runs["ddp"]
    run = _fresh_copy(run, tmp_path)
    point_storage_outside(run / "checkpoints" / "step_1", "../../../config.yaml")
    out = tmp_path / "model.safetensors"
    code, error = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out))
    assert code == 2 and "outside the checkpoint folder" in error[-1] and len(error) == 1
    assert not out.exists()


def test_every_dcp_byte_item_is_read_with_weights_only(tmp_path):
    """The planner itself (not only the paths above) refuses a payload in any byte item it is asked for."""
    from polycom_lm.checkpoint.dcp import load_dcp, save_dcp

    directory = tmp_path / "ck"
    save_dcp(directory, {"extra": {"note": "plain", "values": [1, 2.5, (3, 4)]}, "t": torch.ones(2)}, distributed=False)
    state = {"extra": {"note": None, "values": None}, "t": torch.zeros(2)}
    load_dcp(directory, state, distributed=False)
    assert state["extra"] == {"note": "plain", "values": [1, 2.5, (3, 4)]} and torch.equal(state["t"], torch.ones(2))
    marker = tmp_path / "pwned"
    plant_in_dcp_byte_item(directory, marker, key="extra.note")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle it \(it would load posix.system\)"):
        load_dcp(directory, {"extra": {"note": None, "values": None}, "t": torch.zeros(2)}, distributed=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- DeepSpeed


@pytest.fixture(scope="module")
def deepspeed_checkpoint(tmp_path_factory) -> Path:
    """A genuine ZeRO-2 checkpoint folder (`<dir>/deepspeed/`) of the tiny engine-test model, one process."""
    pytest.importorskip("deepspeed")
    from engine_harness import run_single_process_deepspeed

    directory = tmp_path_factory.mktemp("deepspeed_checkpoint")
    completed = run_single_process_deepspeed(
        "engine_step(engine, fixed_batch(config), 2)\nengine.save_checkpoint(sys.argv[1])\n", str(directory)
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return directory


def _run_folder_with(step_directory: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(step_directory, run / "checkpoints" / "step_1")
    (run / "checkpoints" / "step_1" / "trainer_state.json").write_text(json.dumps(
        {"step": 1, "tokens": 64, "consumed_samples": 4, "skipped_steps": 0, "world_size": 1}))
    (run / "checkpoints" / "latest").write_text("step_1\n")
    return run


def _replace_model_states(step_directory: Path, update: dict) -> None:
    files = list((step_directory / "deepspeed").glob("*model_states.pt"))
    assert files, "no DeepSpeed model states file"
    for path in files:
        state = torch.load(path, weights_only=False)  # our own genuine file, written by the fixture
        state.update(update)
        torch.save(state, path)


@pytest.mark.slow
def test_consolidate_refuses_a_deepspeed_file_that_would_run_code(capsys, deepspeed_checkpoint, tmp_path):
    run = _run_folder_with(deepspeed_checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    _replace_model_states(run / "checkpoints" / "step_1", {"module": Payload(marker)})
    optimizer_file = next((run / "checkpoints" / "step_1" / "deepspeed").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(marker)}, optimizer_file)
    out = tmp_path / "model.safetensors"
    code, error = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out))
    assert code == 2 and error[-1].startswith("error: ") and "posix.system" in error[-1]
    assert "--trust-checkpoint" in error[-1]
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_genuine_deepspeed_checkpoints_need_no_trust_and_unknown_objects_need_it(capsys, deepspeed_checkpoint, tmp_path):
    run = _run_folder_with(deepspeed_checkpoint, tmp_path)
    out = tmp_path / "model.safetensors"
    code, _ = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out))
    assert code == 0 and out.is_file()
    # A harmless object DeepSpeed does not write itself: refused by default, read with --trust-checkpoint.
    _replace_model_states(run / "checkpoints" / "step_1", {"client_note": fractions.Fraction(1, 3)})
    code, error = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out), "--force")
    assert code == 2 and "fractions.Fraction" in error[-1]
    code, _ = _cli(capsys, "checkpoint", "consolidate", str(run), "--out", str(out), "--force", "--trust-checkpoint")
    assert code == 0


@pytest.mark.slow
def test_deepspeed_resume_refuses_a_file_that_would_run_code(deepspeed_checkpoint, tmp_path):
    from engine_harness import run_single_process_deepspeed

    step = tmp_path / "step"
    shutil.copytree(deepspeed_checkpoint, step)
    marker = tmp_path / "pwned"
    _replace_model_states(step, {"module": Payload(marker)})
    completed = run_single_process_deepspeed(
        "from polycom_lm.errors import CheckpointError\n"
        "try:\n"
        "    engine.load_checkpoint(sys.argv[1])\n"
        "except CheckpointError as error:\n"
        "    print('REFUSED', error)\n",
        str(step),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    refused = [line for line in completed.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and "posix.system" in refused[0], completed.stdout[-2000:]
    assert not marker.exists()
