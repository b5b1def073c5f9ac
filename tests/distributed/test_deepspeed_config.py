"""The DeepSpeed JSON generated from our config, and a user JSON merged over it."""

import json

import pytest

from engine_harness import tiny_config
from polycom_lm.distributed.deepspeed_engine import build_deepspeed_config
from polycom_lm.errors import ConfigError


def test_generated_config_follows_the_yaml():
    config = tiny_config(backend="deepspeed", zero_stage=3)
    config.training.global_batch_size, config.training.micro_batch_size = 32, 4
    config.training.precision = "bf16"
    config.optimizer.grad_clip_norm = 0.5
    generated = build_deepspeed_config(config, dp_world_size=2)
    assert generated["zero_optimization"] == {"stage": 3}
    assert (generated["train_micro_batch_size_per_gpu"], generated["gradient_accumulation_steps"]) == (4, 4)
    assert generated["train_batch_size"] == 32
    assert generated["bf16"] == {"enabled": True} and generated["gradient_clipping"] == 0.5
    assert "optimizer" not in generated and "scheduler" not in generated  # ours are passed in


def test_user_json_overrides_nested_keys_and_is_checked(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0}))
    config = tiny_config(backend="deepspeed", zero_stage=2, deepspeed_config=str(user))
    generated = build_deepspeed_config(config, dp_world_size=2)
    assert generated["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert generated["gradient_clipping"] == 2.0

    user.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="ZeRO stage 4"):
        build_deepspeed_config(config, dp_world_size=2)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_deepspeed_config(config, dp_world_size=2)
    config.distributed.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="file not found"):
        build_deepspeed_config(config, dp_world_size=2)
