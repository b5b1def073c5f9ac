"""Pipeline settings without processes: the stage split, the bubble formulas, the layout that `polycom-lm
config` and `info` print, and every setting that cannot work refused in one line before anything starts."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline_worker import pipeline_config
from polycom_lm.distributed.parallelize import check_parallel_config
from polycom_lm.distributed.pipeline import bubble_fraction, stage_layer_counts
from polycom_lm.errors import ConfigError


def test_stage_layer_counts_even_by_default_and_settable_at_the_ends():
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert stage_layer_counts(10, 4) == [2, 3, 3, 2]  # the remainder to the middle stages
    assert stage_layer_counts(8, 4, first=1, last=1) == [1, 3, 3, 1]
    assert stage_layer_counts(4, 2, first=1) == [1, 3]


def test_bubble_fraction_formulas():
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("gpipe", 2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction("interleaved_1f1b", 4, 8, stages_per_rank=2) == pytest.approx(3 / 19)
    assert bubble_fraction("1f1b", 1, 8) == 0.0


@pytest.mark.parametrize("distributed, world, message", [
    ({"pp": 2, "backend": "deepspeed"}, 2, "distributed.backend=deepspeed does not compose with distributed.pp"),
    ({"pp": 4, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2}, 4,
     "model.n_layers=4 cannot be split into 8 pipeline stages"),
    ({"pp": 2, "pp_first_stage_layers": 4}, 2, "cannot be split into 2 pipeline stages"),
    ({"pp": 4, "pp_microbatches": 2}, 4, "distributed.pp_schedule=1f1b needs at least pp=4 micro-batches"),
    ({"pp": 2, "pp_microbatches": 3}, 2, "distributed.pp_microbatches=3 does not divide the 8 sequences"),
    ({"pp": 2, "pp_schedule": "interleaved_1f1b"}, 2, "set distributed.pp_stages_per_rank >= 2"),
    ({"pp": 2, "pp_stages_per_rank": 2}, 2, "distributed.pp_stages_per_rank=2 needs an interleaved schedule"),
    ({"pp": 2, "pp_schedule": "zbv"}, 2, "unknown pipeline schedule 'zbv'"),
    ({"pp": 2, "pp_schedule": "interleaved_zero_bubble", "pp_stages_per_rank": 2, "backend": "fsdp"}, 4,
     "gives wrong gradients with data parallelism"),
    ({"pp": 3}, 4, "world size 4 is not divisible by distributed.pp=3"),
])
def test_pipeline_settings_that_cannot_work_are_refused_in_one_line(distributed, world, message):
    with pytest.raises(ConfigError) as error:
        check_parallel_config(pipeline_config(**distributed), world)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_config_command_prints_the_resolved_layout_and_info_the_bubble(tmp_path, capsys):
    from polycom_lm.cli import main

    path = tmp_path / "pp.yaml"
    raw = {"model": {"n_layers": 8, "tie_embeddings": False},
           "training": {"global_batch_size": 16, "micro_batch_size": 2},
           "data": {"train": [{"source": "builtin:pydoc"}]},
           "distributed": {"backend": "fsdp", "pp": 2, "pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2}}
    path.write_text(yaml.safe_dump(raw))
    assert main(["config", str(path), "--world-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# layout on 4 rank(s): pp 2 x dp 2 x tp 1, backend fsdp\n")
    assert "# per step: 16 sequences" in printed and "4 micro-batch(es) of 2" in printed
    assert "# pipeline: interleaved_1f1b, 4 stages (2 per rank), blocks per stage [2, 2, 2, 2], bubble 11.1%" in printed
    assert yaml.safe_load(printed)["distributed"]["pp"] == 2  # the output still loads as the config
    assert main(["info", str(path), "--world-size", "4"]) == 0
    pipeline = json.loads(capsys.readouterr().out)["pipeline"]
    assert pipeline["micro_batches"] == 4 and pipeline["layers_per_stage"] == [2, 2, 2, 2]
    assert pipeline["bubble_fraction"] == pytest.approx(1 / 9)  # (p - 1) / (v m + p - 1) = 1 / (8 + 1)
