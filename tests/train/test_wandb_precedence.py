"""Who decides wandb's settings: a key set in the config, else wandb's own environment variable, else our
default (offline mode, project polycom_lm, ...). Checked on the `wandb.init` arguments and on real wandb
runs in offline and disabled mode (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polycom_lm.config import LoggingConfig
from polycom_lm.train import run_training
from polycom_lm.train.callbacks.wandb import wandb_mode, wandb_settings
from trainer_test_helpers import cli_environment, load, run_config, write_config

ENVIRONMENT = {
    "WANDB_MODE": "online",
    "WANDB_PROJECT": "env_project",
    "WANDB_ENTITY": "env_entity",
    "WANDB_RUN_GROUP": "env_group",
    "WANDB_NAME": "env_name",
    "WANDB_TAGS": "env_a,env_b",
    "WANDB_DIR": "/env/dir",
}


def _config(prepared_data, tmp_path, logging: dict):
    raw = run_config(prepared_data, tmp_path / "run")
    raw["logging"] = {"progress_bar": False, **logging}
    return load(raw)


def test_keys_set_in_the_config_win_over_the_environment(prepared_data, tmp_path):
    config = _config(prepared_data, tmp_path, {
        "wandb_mode": "disabled", "wandb_project": "p", "wandb_entity": "e", "wandb_group": "g",
        "wandb_run_name": "n", "wandb_tags": ["t"], "wandb_dir": str(tmp_path / "d")})
    settings = wandb_settings(config, tmp_path / "run", environ=ENVIRONMENT)
    assert {key: settings[key] for key in ("mode", "project", "entity", "group", "name", "dir")} == {
        "mode": "disabled", "project": "p", "entity": "e", "group": "g", "name": "n", "dir": str(tmp_path / "d")}
    assert settings["tags"] == ["t", "polynorm", "dense"]
    assert wandb_mode(config.logging, ENVIRONMENT) == "disabled"


def test_unset_keys_leave_the_choice_to_wandbs_environment(prepared_data, tmp_path):
    config = _config(prepared_data, tmp_path, {})
    settings = wandb_settings(config, tmp_path / "run", environ=ENVIRONMENT)
    # None: wandb.init reads the variable itself (init arguments would override it).
    assert [settings[key] for key in ("mode", "project", "entity", "group", "name", "dir")] == [None] * 6
    assert settings["tags"] == ["env_a", "env_b", "polynorm", "dense"]  # init's tags replace WANDB_TAGS: kept
    assert wandb_mode(config.logging, ENVIRONMENT) == "online"
    assert wandb_mode(config.logging, {"WANDB_MODE": "dryrun"}) == "offline"
    assert wandb_mode(config.logging, {"WANDB_MODE": "disabled"}) == "disabled"


def test_offline_is_the_default_only_when_neither_config_nor_environment_says(prepared_data, tmp_path):
    config = _config(prepared_data, tmp_path, {})
    settings = wandb_settings(config, tmp_path / "run", environ={"WANDB_API_KEY": "unrelated"})
    assert (settings["mode"], settings["project"], settings["entity"]) == ("offline", "polycom_lm", None)
    assert (settings["group"], settings["name"], settings["dir"]) == ("trainer_test", "run", str(tmp_path / "run"))
    assert settings["tags"] == ["polynorm", "dense"]
    assert wandb_mode(LoggingConfig(), {}) == "offline"


def test_a_real_offline_run_takes_project_group_name_and_folder_from_the_environment(prepared_data, tmp_path):
    # A fresh process, as in a job script: wandb reads its environment once per process, at its first setup.
    raw = run_config(prepared_data, tmp_path / "run")
    raw["logging"] = {"progress_bar": False, "wandb_tags": ["mine"]}
    config_path = write_config(tmp_path / "config.yaml", raw)
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from polycom_lm.config import load_config\n"
        "from polycom_lm.train.callbacks.wandb import WandbCallback\n"
        "output = Path(sys.argv[2]); output.mkdir()\n"
        "callback = WandbCallback(load_config(sys.argv[1]), output)\n"
        "callback.on_train_start(trainer=None)\n"
        "run = callback._run\n"
        "print(json.dumps([run.project, run.group, run.name, sorted(run.tags), run.settings.mode]))\n"
        "callback.close()\n"
    )
    environment = {**cli_environment(), "WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_PROJECT": "from_env",
                   "WANDB_RUN_GROUP": "env_group", "WANDB_NAME": "env_name", "WANDB_DIR": str(tmp_path / "wandb_home")}
    process = subprocess.run([sys.executable, "-c", script, str(config_path), str(tmp_path / "run")],
                             env=environment, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    project, group, name, tags, mode = json.loads(process.stdout.strip().splitlines()[-1])
    assert (project, group, name, mode) == ("from_env", "env_group", "env_name", "offline")
    assert tags == ["dense", "mine", "polynorm"]
    assert list((tmp_path / "wandb_home").rglob("offline-run-*/run-*.wandb"))  # WANDB_DIR, not the run's folder
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("config_mode, environment_mode, expect_files", [
    (None, "disabled", False),  # the environment decides
    (None, None, True),  # neither: offline
    ("offline", "disabled", True),  # the config wins
])
def test_a_training_run_writes_wandb_files_exactly_when_the_resolved_mode_is_not_disabled(
        prepared_data, tmp_path, monkeypatch, config_mode, environment_mode, expect_files):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    if environment_mode is not None:
        monkeypatch.setenv("WANDB_MODE", environment_mode)
    raw = run_config(prepared_data, tmp_path / "run", max_steps=1, eval_every_steps=0, save_every_steps=0)
    raw["logging"] = {"progress_bar": False, **({"wandb_mode": config_mode} if config_mode else {})}
    run_training(load(raw))
    found = list(Path(tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert bool(found) == expect_files
