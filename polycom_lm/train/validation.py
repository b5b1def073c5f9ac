"""Config checks that need more than types: one `ConfigError` per bad value, one line, naming the key.

`validate_config(config, world_size)` runs before anything is built or written, so a bad value never
leaves a half-made run behind. It also derives the batch layout (`BatchLayout`) the loop uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from polycom_lm.activations import ACTIVATIONS
from polycom_lm.config import Config
from polycom_lm.distributed.parallelize import check_parallel_config
from polycom_lm.distributed.pipeline import pipeline_micro_batches
from polycom_lm.errors import ConfigError
from polycom_lm.models import MODEL_FAMILIES
from polycom_lm.train.stop import parse_duration, signal_numbers


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split (all sizes in sequences of `seq_len` tokens)."""

    global_batch_size: int
    dp_world_size: int
    local_batch_size: int  # per data-parallel rank per step
    micro_batch_size: int
    accumulation_steps: int  # micro-batches per rank per step
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def data_parallel_size(config: Config, world_size: int) -> int:
    parallel = config.distributed.tp * config.distributed.pp
    if world_size % parallel:
        raise ConfigError(
            f"distributed.tp={config.distributed.tp} does not divide the world size {world_size}"
        )
    return world_size // parallel


def batch_layout(config: Config, world_size: int) -> BatchLayout:
    training = config.training
    if training.global_batch_tokens is not None:
        if training.global_batch_tokens <= 0 or training.global_batch_tokens % training.seq_len:
            raise ConfigError(
                f"training.global_batch_tokens={training.global_batch_tokens} must be a positive multiple of "
                f"training.seq_len={training.seq_len}"
            )
        global_batch = training.global_batch_tokens // training.seq_len
    else:
        global_batch = training.global_batch_size
    dp = data_parallel_size(config, world_size)
    if global_batch <= 0 or training.micro_batch_size <= 0:
        raise ConfigError(
            f"training.global_batch_size={global_batch} and training.micro_batch_size="
            f"{training.micro_batch_size} must be positive"
        )
    if global_batch % (training.micro_batch_size * dp):
        raise ConfigError(
            f"global batch of {global_batch} sequences is not divisible by training.micro_batch_size="
            f"{training.micro_batch_size} x {dp} data-parallel ranks; use a global batch that is a multiple "
            f"of {training.micro_batch_size * dp}"
        )
    local = global_batch // dp
    if config.distributed.pp > 1:  # the pipeline's micro-batches (checked by check_parallel_config)
        micro_batches = pipeline_micro_batches(config, local)
        return BatchLayout(global_batch, dp, local, local // micro_batches, micro_batches, training.seq_len)
    return BatchLayout(global_batch, dp, local, training.micro_batch_size, local // training.micro_batch_size, training.seq_len)


def _positive(value: float, key: str, allow_zero: bool = False, hint: str = "") -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} is invalid; it must be {bound}{hint}")


def validate_config(config: Config, world_size: int = 1) -> BatchLayout:
    """Check values the type system cannot; return the batch layout for `world_size` processes."""
    optimizer, schedule, training = config.optimizer, config.schedule, config.training
    _positive(optimizer.lr, "optimizer.lr")
    if len(optimizer.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in optimizer.betas):
        raise ConfigError(f"optimizer.betas={optimizer.betas} is invalid; it must be two numbers in [0, 1)")
    _positive(optimizer.eps, "optimizer.eps")
    for key in ("weight_decay", "weight_decay_norms", "weight_decay_embeddings", "weight_decay_activation"):
        _positive(getattr(optimizer, key), f"optimizer.{key}", allow_zero=True)
    if optimizer.grad_clip_norm is not None:
        _positive(optimizer.grad_clip_norm, "optimizer.grad_clip_norm")

    _validate_model(config)
    _positive(training.max_steps, "training.max_steps")
    _positive(training.seq_len, "training.seq_len")
    if not 0 <= training.seed < 2**63:
        raise ConfigError(f"training.seed={training.seed} is invalid; it must be an integer in [0, 2**63)")
    _positive(training.max_consecutive_skips, "training.max_consecutive_skips")
    if training.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"training.seq_len={training.seq_len} exceeds the model's maximum model.max_seq_len="
            f"{config.model.max_seq_len}"
        )
    _positive(training.log_every_steps, "training.log_every_steps")
    _positive(training.eval_every_steps, "training.eval_every_steps", True, " (0: evaluate only at the end)")
    _positive(training.save_every_steps, "training.save_every_steps", True, " (0: save only at the end)")
    _positive(training.keep_last_checkpoints, "training.keep_last_checkpoints")
    _positive(training.profile_num_steps, "training.profile_num_steps")
    if not training.output_dir.strip():
        raise ConfigError("training.output_dir is empty; give the folder the run writes to")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", training.device):
        raise ConfigError(f"training.device={training.device!r} is invalid; use auto, cpu, cuda or cuda:N")
    _positive(training.cross_entropy_chunk_tokens, "training.cross_entropy_chunk_tokens")
    if training.cross_entropy == "fused" and config.distributed.tp > 1:
        raise ConfigError(
            "training.cross_entropy=fused needs the whole vocabulary on each rank; with distributed.tp="
            f"{config.distributed.tp} the logits are sharded over the vocabulary: use training.cross_entropy=logits"
        )
    if training.param_dtype == "bf16" and training.precision != "bf16":
        raise ConfigError("training.param_dtype=bf16 needs training.precision=bf16")
    signal_numbers(training.stop_signals)
    _positive(training.stop_grace_seconds, "training.stop_grace_seconds")
    if training.time_limit is not None:
        parse_duration(training.time_limit, "training.time_limit")
    if config.distributed.timeout_seconds is not None:
        _positive(config.distributed.timeout_seconds, "distributed.timeout_seconds", hint=" (null: timeout_minutes)")
    _positive(config.distributed.timeout_minutes, "distributed.timeout_minutes")
    if training.async_checkpoint and config.distributed.backend == "deepspeed":
        raise ConfigError("training.async_checkpoint=true is not available with distributed.backend=deepspeed "
                          "(DeepSpeed writes its own format synchronously); set it to false or use fsdp / ddp")

    if config.evaluation.micro_batch_size is not None:
        _positive(config.evaluation.micro_batch_size, "evaluation.micro_batch_size")
    if config.evaluation.max_tokens is not None:
        _positive(config.evaluation.max_tokens, "evaluation.max_tokens")

    _validate_schedule(config)
    layout = batch_layout(config, world_size)

    if not config.data.train:
        raise ConfigError("data.train is empty; name at least one source (e.g. builtin:pydoc or a shard folder)")
    _check_registered(config, world_size)
    _check_optional_packages(config)
    return layout


def _validate_model(config: Config) -> None:
    """Sizes positive, and the numbers every step divides by or exponentiates finite and positive (a
    negative eps or a zero RoPE base would make every step NaN)."""
    model = config.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden_size", "max_seq_len", "activation_order"):
        _positive(getattr(model, key), f"model.{key}")
    for key in ("n_kv_heads", "head_dim", "ffn_width"):
        if getattr(model, key) is not None:
            _positive(getattr(model, key), f"model.{key}")
    for key in ("init_std", "norm_eps", "rope_theta"):
        _positive(getattr(model, key), f"model.{key}")
    if model.init_truncation is not None:
        _positive(model.init_truncation, "model.init_truncation", hint=" (standard deviations; null: no truncation)")
    for key in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(model, key) < 1.0:
            raise ConfigError(f"model.{key}={getattr(model, key)} is invalid; it must be in [0, 1)")


def _check_optional_packages(config: Config) -> None:
    """Features whose package is an extra, left out of the training-only install (`setup_env.sh train`)."""
    import importlib.util

    wanted = {"deepspeed": ("distributed.backend=deepspeed", config.distributed.backend == "deepspeed"),
              "tensorboard": ("logging.tensorboard=true", config.logging.tensorboard)}
    for package, (setting, used) in wanted.items():
        if used and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{setting} needs the {package} package, which is not installed; "
                              f"pip install 'polycom_lm[{package}]' (or bash scripts/setup_env.sh for every extra)")


def _validate_schedule(config: Config) -> None:
    schedule, training = config.schedule, config.training
    _positive(schedule.warmup_steps, "schedule.warmup_steps", allow_zero=True)
    _positive(schedule.warmup_tokens, "schedule.warmup_tokens", allow_zero=True)
    _positive(schedule.decay_steps, "schedule.decay_steps", allow_zero=True)
    _positive(schedule.decay_tokens, "schedule.decay_tokens", allow_zero=True)
    if not 0.0 <= schedule.lr_min_ratio <= 1.0:
        raise ConfigError(f"schedule.lr_min_ratio={schedule.lr_min_ratio} is invalid; it must be in [0, 1]")
    if not 0.0 <= schedule.warmup_start_ratio < 1.0:
        raise ConfigError(f"schedule.warmup_start_ratio={schedule.warmup_start_ratio} is invalid; it must be in [0, 1)")
    if schedule.units == "steps":
        warmup, decay, total, unit = schedule.warmup_steps, schedule.decay_steps, training.max_steps, "steps"
    else:
        tokens_per_step = (
            training.global_batch_tokens
            if training.global_batch_tokens is not None
            else training.global_batch_size * training.seq_len
        )
        warmup, decay, total, unit = schedule.warmup_tokens, schedule.decay_tokens, training.max_steps * tokens_per_step, "tokens"
    if warmup > total:
        raise ConfigError(f"schedule.warmup_{unit}={warmup} exceeds the run's {total} {unit}")
    if schedule.name in ("cosine", "linear") and 0 < decay <= warmup:
        raise ConfigError(
            f"schedule.decay_{unit}={decay} is invalid for {schedule.name}: the decay must end after the warmup "
            f"({warmup} {unit}); 0 ends it with the run"
        )
    if schedule.name == "wsd":
        if decay <= 0 or warmup + decay > total:
            raise ConfigError(
                f"schedule.decay_{unit}={decay} is invalid for wsd; it must be > 0 and warmup + decay <= the "
                f"run's {total} {unit}"
            )


def _check_registered(config: Config, world_size: int) -> None:
    """Unknown activation / model family / backend (the registries' own one-line errors), and parallelism
    settings the engine cannot run on `world_size` ranks."""
    if config.model.activation not in ACTIVATIONS:
        raise ConfigError("model.activation: " + ACTIVATIONS.unknown_message(config.model.activation))
    if config.model.family not in MODEL_FAMILIES:
        raise ConfigError("model.family: " + MODEL_FAMILIES.unknown_message(config.model.family))
    check_parallel_config(config, world_size)
