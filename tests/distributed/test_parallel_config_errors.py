"""Engine-specific bad configs fail with one clear line before any work starts (no process group, no
model build): ZeRO stage 4, a TP degree that does not divide the heads or the FFN width, a world size not
divisible by TP, an HSDP replicate degree that does not divide the data-parallel size."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine_harness import REPOSITORY, build_tiny_model, tiny_config
from polycom_lm.distributed.parallelize import check_parallel_config
from polycom_lm.distributed.tensor_parallel import check_tensor_parallel_widths
from polycom_lm.errors import ConfigError


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_zero_stage_4_is_rejected_naming_the_valid_stages():
    with pytest.raises(ConfigError) as error:
        check_parallel_config(tiny_config(backend="deepspeed", zero_stage=4), world_size=2)
    assert "distributed.zero_stage=4" in one_line(error) and "1, 2, 3" in str(error.value)


def test_world_size_not_divisible_by_tp_is_rejected():
    with pytest.raises(ConfigError) as error:
        check_parallel_config(tiny_config(backend="fsdp", tp=2), world_size=3)
    assert "world size 3" in one_line(error) and "distributed.tp=2" in str(error.value)


def test_tp_that_does_not_divide_the_heads_is_rejected_with_valid_degrees():
    # 4 query heads, 2 kv heads: tp 4 divides the query heads but not the kv heads.
    with pytest.raises(ConfigError) as error:
        check_parallel_config(tiny_config(backend="fsdp", tp=4), world_size=4)
    assert "n_kv_heads=2" in one_line(error) and "valid tp degrees: 1, 2" in str(error.value)


def test_tp_that_does_not_divide_the_ffn_width_is_rejected():
    config = tiny_config("polynorm")
    config.model.ffn_width = 90  # heads still divide by 2 ... but 90 / 4 is not whole
    config.model.n_heads, config.model.n_kv_heads = 4, 4
    model = build_tiny_model(config)
    check_tensor_parallel_widths(model, 2)
    with pytest.raises(ConfigError) as error:
        check_tensor_parallel_widths(model, 4)
    assert "FFN width 90" in one_line(error)


def test_hsdp_replicate_degree_must_divide_data_parallel_size():
    with pytest.raises(ConfigError) as error:
        check_parallel_config(tiny_config(backend="fsdp", fsdp_replicate=3), world_size=4)
    assert "fsdp_replicate=3" in one_line(error)


def test_deepspeed_with_tensor_parallel_is_rejected():
    with pytest.raises(ConfigError, match="deepspeed"):
        check_parallel_config(tiny_config(backend="deepspeed", tp=2), world_size=2)


@pytest.mark.slow
def test_cli_reports_bad_engine_config_before_training(tmp_path):
    """Through `polycom-lm train`: exit status 2, one `error:` line, no run folder written."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        "base: " + str(REPOSITORY / "configs" / "model" / "tiny.yaml") + "\n"
        "training:\n  output_dir: " + str(tmp_path / "run") + "\n"
        "data:\n  train:\n  - source: builtin:pydoc\n  cache_dir: " + str(tmp_path / "cache") + "\n"
        "distributed:\n  backend: deepspeed\n  zero_stage: 4\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "polycom_lm.cli", "train", str(config)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "zero_stage" in completed.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_sequence_parallel_needs_a_sequence_length_divisible_by_tp():
    config = tiny_config(backend="fsdp", tp=2, sequence_parallel=True)
    config.training.seq_len = 15
    with pytest.raises(ConfigError) as error:
        check_parallel_config(config, world_size=2)
    assert "training.seq_len=15" in one_line(error)


def test_fused_cross_entropy_with_tensor_parallel_is_rejected():
    from polycom_lm.train.validation import validate_config

    config = tiny_config(backend="fsdp", tp=2)
    config.training.cross_entropy = "fused"
    with pytest.raises(ConfigError) as error:
        validate_config(config, world_size=2)
    assert "training.cross_entropy=fused" in one_line(error) and "training.cross_entropy=logits" in str(error.value)
    config.training.cross_entropy, config.training.cross_entropy_chunk_tokens = "fused", 0
    config.distributed.tp = 1
    with pytest.raises(ConfigError) as error:
        validate_config(config, world_size=2)
    assert "training.cross_entropy_chunk_tokens=0" in one_line(error)
