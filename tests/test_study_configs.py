"""The dense_1b and olmoe_1b_7b study configs run as written: they load and validate for a multi-GPU job,
name real data (streamed hub datasets, whose specs parse without network), tokenizers by hub id and named
validation sets, and hold no placeholder paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from polycom_lm.cli import main
from polycom_lm.config import load_config
from polycom_lm.data.hub import is_hub_id
from polycom_lm.data.sources import HuggingFaceSource, SourceOptions, open_source
from polycom_lm.train.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("dense_1b", "olmoe_1b_7b")
# Each study folder also holds a study file (`study.yaml`, for `polycom-lm study`): not a training config.
CONFIGS = sorted(path for study in STUDIES for path in (ROOT / "configs" / "experiments" / study).glob("*.yaml")
                 if path.name != "study.yaml")


def test_every_study_file_is_covered():
    assert len(CONFIGS) == 12 and {path.stem for path in CONFIGS} == {
        "base", "gelu", "polynorm", "polyrelu", "relu", "swiglu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_study_config_loads_validates_and_names_real_data(path):
    config = load_config(path)
    for world_size in (8, 16):  # one and two 8-GPU nodes
        validate_config(config, world_size)
    data = config.data
    assert "/path/to" not in path.read_text() and "PLACEHOLDER" not in path.read_text()
    assert data.streaming and data.train
    for entry in data.train:
        source = open_source(entry.source, SourceOptions(data.text_field))
        assert isinstance(source, HuggingFaceSource) and not Path(source.name).exists()
    assert len(data.validation) >= 2 and len({entry.name for entry in data.validation}) == len(data.validation)
    for entry in data.validation:
        assert isinstance(open_source(entry.source, SourceOptions()), HuggingFaceSource)
        assert entry.source.endswith(":validation")
    assert data.tokenizer.path and is_hub_id(data.tokenizer.path)


def test_the_olmoe_mix_weights_follow_the_subsets_token_counts():
    config = load_config(ROOT / "configs" / "experiments" / "olmoe_1b_7b" / "polynorm.yaml")
    weights = {entry.source.rsplit("/", 1)[1]: entry.weight for entry in config.data.train}
    assert set(weights) == {"dclm", "starcoder", "pes2o", "arxiv", "open-web-math", "algebraic-stack", "wiki"}
    assert weights["dclm"] / sum(weights.values()) == pytest.approx(0.949, abs=1e-3)


def test_config_command_accepts_the_study_configs_as_written(capsys):
    assert main(["config", str(ROOT / "configs" / "experiments" / "dense_1b" / "polynorm.yaml"), "--world-size", "8"]) == 0
    assert "hf:cerebras/SlimPajama-627B" in capsys.readouterr().out
