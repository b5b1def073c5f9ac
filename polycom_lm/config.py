"""Typed experiment configuration.

The YAML mirrors these dataclasses one to one. `load_config(path, overrides)` reads a YAML file, follows
its `base:` chain (one file or a list, merged in order, later wins), applies dotted `key=value`
overrides, and converts the result into a `Config`, checking every key and type on the way. Errors are
`ConfigError`s that name the key, the file it came from and what would be valid.

Units are in the names (`warmup_steps`, `save_every_steps`); sizes of batches are in sequences unless the
name says tokens.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from polycom_lm.errors import ConfigError

# ----------------------------------------------------------------------------------------------- sections


@dataclass
class MoEConfig:
    """Mixture-of-experts FFN (used when `model.family` is `moe`)."""

    num_experts: int = 64
    top_k: int = 8
    # Gated (SwiGLU) expert width; non-gated activations get 3/2 of it unless `expert_width` is set.
    expert_hidden_size: int = 1024
    expert_width: Optional[int] = None
    norm_topk_prob: bool = False
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    per_expert_coefficients: bool = False
    # How each projection over all experts runs: grouped_mm (torch._grouped_mm), padded_bmm (the batched
    # fallback), or auto (grouped_mm where the installed torch has it on the device).
    expert_matmul: Literal["auto", "grouped_mm", "padded_bmm"] = "auto"

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "expert_hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.moe.{name} must be positive, got {getattr(self, name)}")
        if self.expert_width is not None and self.expert_width < 1:
            raise ConfigError(f"model.moe.expert_width must be positive, got {self.expert_width}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model.moe.top_k {self.top_k} is larger than model.moe.num_experts {self.num_experts}; "
                f"top_k must be between 1 and num_experts"
            )
        for name in ("lb_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    family: str = "dense"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: multi-head attention (n_kv_heads == n_heads)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    # The gated (SwiGLU) FFN width. Non-gated activations use 3/2 of it so that parameters match,
    # unless `ffn_width` sets the width explicitly (the activation's output and out-proj's input; a gated
    # in-proj is twice as wide).
    ffn_hidden_size: int = 1376
    ffn_width: Optional[int] = None
    activation: str = "swiglu"
    activation_order: int = 3  # r, the order of PolyNorm / PolyReLU / Poly
    activation_impl: str = "auto"  # auto | reference | fused | compiled
    # Projections: "auto" runs fp32 CPU matmuls through oneDNN (faster than MKL here, see models/linear.py),
    # "aten" always takes F.linear.
    linear_impl: Literal["auto", "aten"] = "auto"
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qk_norm_scope: Literal["head", "full"] = "head"  # OLMoE normalises the full projection width
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Output projections (attention out, FFN out) start with std init_std / sqrt(2 * n_layers).
    init_depth_scaled: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataSourceConfig:
    """One training data source: a prepared shard folder, or a raw source that gets tokenised and cached
    (a path / glob / directory, `hf:NAME[:CONFIG][:SPLIT]`, or `builtin:pydoc`)."""

    source: str = ""
    weight: float = 1.0


@dataclass
class ValidationSetConfig:
    name: str = ""
    source: str = ""


@dataclass
class TokenizerConfig:
    # An existing tokenizer folder (SentencePiece or Hugging Face). None: train a SentencePiece model on
    # the first training source and cache it.
    path: Optional[str] = None
    vocab_size: int = 8192
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    special_tokens: list[str] = field(default_factory=list)
    train_max_chars: int = 20_000_000  # characters of text sampled to train the tokenizer


@dataclass
class DataConfig:
    train: list[DataSourceConfig] = field(default_factory=list)
    validation: list[ValidationSetConfig] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: str = ".cache/polycom_lm/data"
    # For a raw training source without explicit validation sets: hold out this fraction of documents.
    val_fraction: float = 0.0
    preprocess_workers: int = 2
    text_field: str = "text"  # the field holding a document in jsonl / json / parquet / Hugging Face rows
    # Plain text files: None (one document per file), a line that separates documents (e.g. "<|endoftext|>"),
    # or "blank_lines" (one or more blank lines separate documents).
    document_delimiter: Optional[str] = None
    decode_errors: Literal["strict", "replace"] = "strict"  # bad UTF-8: an error naming file and byte, or U+FFFD
    document_masks: bool = False  # packed documents attend only within themselves (block-diagonal causal mask)


@dataclass
class OptimizerConfig:
    """AdamW; weight decay per parameter group (see `polycom_lm.train.optim`)."""

    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4  # peak learning rate; the schedule multiplies it
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices
    weight_decay_norms: float = 0.0  # norm gains and biases
    weight_decay_embeddings: float = 0.0
    weight_decay_activation: float = 0.0  # PolyCom coefficients
    grad_clip_norm: Optional[float] = 1.0  # global L2 norm; null: no clipping (the norm is still logged)
    fused: Optional[bool] = None  # None: fused where the device supports it


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine / linear decay to lr_min_ratio · lr, or
    warmup-stable-decay (wsd: constant, then a linear decay over the last decay_steps / decay_tokens)."""

    name: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    units: Literal["steps", "tokens"] = "steps"  # which of the *_steps / *_tokens fields count
    warmup_steps: int = 0
    warmup_tokens: int = 0
    # Warmup-stable-decay: length of the final decay phase.
    decay_steps: int = 0
    decay_tokens: int = 0
    lr_min_ratio: float = 0.1  # final lr as a fraction of optimizer.lr


@dataclass
class TrainingConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    seq_len: int = 256
    global_batch_size: int = 8  # sequences
    global_batch_tokens: Optional[int] = None  # if set, overrides global_batch_size (must divide by seq_len)
    micro_batch_size: int = 8  # sequences per rank per forward
    seed: int = 1234
    log_every_steps: int = 10
    eval_every_steps: int = 100
    save_every_steps: int = 500
    keep_last_checkpoints: int = 3  # older checkpoints are deleted once a newer one is complete
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 without fp32 master weights when set to bf16
    activation_checkpointing: Literal["none", "activation", "block"] = "none"
    compile: bool = False  # torch.compile each transformer block and the loss (every experiment config turns it on;
    # off by default so that tests and one-off runs pay no compile time)
    on_nonfinite: Literal["skip", "stop"] = "skip"  # NaN/inf loss or gradient norm: drop the update, or stop
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch.profiler trace (Chrome JSON under <output_dir>/profile/) of steps [start, start + num_steps).
    profile_start_step: Optional[int] = None
    profile_num_steps: int = 3


@dataclass
class DistributedConfig:
    backend: str = "ddp"  # ddp | fsdp | deepspeed
    tp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 1
    fsdp_cpu_offload: bool = False
    fsdp_replicate: int = 1  # HSDP: replicate degree (shard degree = dp / replicate)
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON whose keys override the generated ones
    timeout_minutes: int = 30


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "polycom_lm"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None  # None: the experiment name
    wandb_run_name: Optional[str] = None
    wandb_tags: list[str] = field(default_factory=list)
    tensorboard: bool = False
    progress_bar: bool = True
    log_activation_coefficients: bool = True  # PolyNorm / PolyReLU coefficients of every layer, every log step


@dataclass
class EvaluationConfig:
    micro_batch_size: Optional[int] = None  # None: training.micro_batch_size
    max_tokens: Optional[int] = None  # cap per validation set; None: the whole set


@dataclass
class Config:
    experiment: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading

OVERRIDE_ORIGIN = "command-line override"


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Load `path` (following `base:` files), apply dotted `key=value` overrides, return a typed Config."""
    raw, origins = _load_yaml_tree(Path(path), chain=())
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
        origins[key] = OVERRIDE_ORIGIN
    return from_dict(Config, raw, origins=origins)


def config_from_dict(raw: dict[str, Any], overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from an in-memory mapping (as loaded from YAML), with optional overrides."""
    raw = _deep_copy(raw)
    origins: dict[str, str] = {}
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
        origins[key] = OVERRIDE_ORIGIN
    return from_dict(Config, raw, origins=origins)


def parse_override(text: str) -> tuple[str, Any]:
    """`"model.activation=polynorm"` → `("model.activation", "polynorm")`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. model.activation=polynorm)")
    key, _, value_text = text.partition("=")
    key = key.strip().removeprefix("--")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected a dotted key like training.max_steps")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_first_line(error)})") from None
    return key, value


def _load_yaml_tree(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(error)})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if bases is not None:
        base_list = [bases] if isinstance(bases, str) else bases
        if not isinstance(base_list, list) or not all(isinstance(b, str) for b in base_list):
            raise ConfigError(f"{path}: 'base' must be a file path or a list of file paths, got {bases!r}")
        for base in base_list:
            base_data, base_origins = _load_yaml_tree(path.parent / base, (*chain, resolved))
            _deep_merge(merged, base_data)
            origins.update(base_origins)
    _deep_merge(merged, data)
    for key in _dotted_keys(data):
        origins[key] = str(path)
    return merged, origins


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = _deep_copy(value)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for index, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: index + 1])
            raise ConfigError(f"override {key}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ------------------------------------------------------------------------------------------- conversion


def from_dict(cls: type, data: Any, origins: Optional[dict[str, str]] = None, prefix: str = "") -> Any:
    """Convert a mapping into dataclass `cls`, checking keys and types recursively."""
    origins = origins or {}
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}{_origin(origins, prefix.rstrip('.'))}: expected a mapping of {cls.__name__} keys, "
            f"got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {dotted!r}{_origin(origins, dotted)}{hint}; valid keys under {where}: "
                f"{', '.join(valid)}"
            )
        kwargs[key] = _convert(hints[key], value, dotted, origins)
    return cls(**kwargs)


def _origin(origins: dict[str, str], dotted: str) -> str:
    while dotted:
        if dotted in origins:
            return f" in {origins[dotted]}"
        dotted = dotted.rpartition(".")[0]
    return ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return f"mapping to {_type_name(typing.get_args(annotation)[1])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(annotation: Any, value: Any, dotted: str, origins: dict[str, str]) -> Any:
    def fail() -> ConfigError:
        return ConfigError(
            f"{dotted}{_origin(origins, dotted)}: expected {_type_name(annotation)}, got {value!r}"
        )

    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, origins, dotted + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise fail()
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, dotted, origins)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item_type,) = typing.get_args(annotation)
        return [_convert(item_type, item, f"{dotted}[{i}]", origins) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, item_type = typing.get_args(annotation)
        return {str(k): _convert(item_type, v, f"{dotted}.{k}", origins) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise fail() from None
            if number.is_integer():
                return int(number)
        raise fail()
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail()
    if annotation is Any:
        return value
    raise TypeError(f"config field {dotted} has an unsupported annotation {annotation!r}")
