"""The experiment config schema: typed dataclasses that the YAML mirrors one to one.

Units are in the names (`warmup_steps`, `save_every_steps`); sizes of batches are in sequences unless the
name says tokens. Reading YAML into these classes is `loading.py` (files, `base:` chains, overrides) and
`conversion.py` (keys and types).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

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
    activation_impl: Literal["auto", "reference", "fused", "compiled"] = "auto"
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
    # Every normal init truncated at ± init_truncation standard deviations (OLMo's init_cutoff_factor);
    # null: not truncated.
    init_truncation: Optional[float] = None
    # Dropout probabilities while training (Megatron-LM's --attention-dropout / --hidden-dropout): on the
    # attention weights; on the embedding output and on each residual branch's output before its add.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class DataSourceConfig:
    """One training data source: a prepared shard folder, or a raw source (a path / glob / directory,
    `hf:NAME[:CONFIG][:SPLIT]`, or `builtin:pydoc`) that is tokenised into the cache before training, or
    on the fly while training (`streaming`)."""

    source: str = ""
    weight: float = 1.0
    # Token budget: the source is its first max_tokens tokens (documents in order, the last one cut); the
    # cache holds only those, and a stream starts its next epoch there. None: the whole source.
    max_tokens: Optional[int] = None
    streaming: Optional[bool] = None  # None: data.streaming


@dataclass
class ValidationSetConfig:
    name: str = ""
    source: str = ""
    max_tokens: Optional[int] = None  # tokenise (and keep) only the first max_tokens tokens; None: all


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
    # Raw training sources: tokenise on the fly while training (true) instead of into cache_dir before step
    # 1 (false); data.train[].streaming overrides it per source. Validation sets are always cached.
    streaming: bool = False
    stream_workers: int = 2  # tokeniser processes per rank for streamed sources (0: in the reader process)
    # Preprocessed sources: visit each epoch's samples in a seeded random order (true) or in file order.
    # Streamed sources are read in their own order either way.
    shuffle: bool = True
    # For a raw training source without explicit validation sets: hold out this fraction of documents.
    val_fraction: float = 0.0
    preprocess_workers: int = 2
    text_field: str = "text"  # the field holding a document in jsonl / json / parquet / Hugging Face rows
    # Plain text files: None (one document per file), a line that separates documents (e.g. "<|endoftext|>"),
    # or "blank_lines" (one or more blank lines separate documents).
    document_delimiter: Optional[str] = None
    decode_errors: Literal["strict", "replace"] = "strict"  # bad UTF-8: an error naming file and byte, or U+FFFD
    # normalize: \r\n and lone \r become \n in every document (as Python's text mode reads files); keep: as
    # decoded. A UTF-8 byte order mark at the start of a file is dropped either way.
    newlines: Literal["normalize", "keep"] = "normalize"
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
    # Warmup rises linearly from this fraction of optimizer.lr (OLMo: 0.1) to the peak.
    warmup_start_ratio: float = 0.0
    # cosine / linear: where the decay reaches lr_min_ratio, counted from the start of training (0: at the
    # end of the run). A horizon beyond the run leaves its lr on the early, slowly falling part of the
    # curve (OLMoE: 5T tokens for a 200B run). wsd: the length of the final decay phase.
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
    # logits: the head's logits for the whole micro-batch, then the loss; fused: the head and the loss
    # together, `cross_entropy_chunk_tokens` tokens at a time, never holding all logits (models/lm_head.py)
    cross_entropy: Literal["logits", "fused"] = "logits"
    cross_entropy_chunk_tokens: int = 2048
    on_nonfinite: Literal["skip", "stop"] = "skip"  # NaN/inf loss or gradient norm: drop the update, or stop
    max_consecutive_skips: int = 10  # `skip` stops (saving the last good state) after this many in a row
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch.profiler trace (Chrome JSON under <output_dir>/profile/) of steps [start, start + num_steps).
    profile_start_step: Optional[int] = None
    profile_num_steps: int = 3
    # Cluster life (train/stop.py). Any of these signals, on any rank, makes every rank finish its step,
    # write one checkpoint and exit with status 128 + the signal's number (SLURM sends SIGTERM before a
    # kill, and USR1 with `--signal=B:USR1@seconds`; launch/ forwards both).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Wall-clock budget of one launch, e.g. "3h50m", "90m", "45s": the run stops and saves before it, counting
    # the longest step and the longest save measured so far; exits 0 and continues when started again.
    time_limit: Optional[str] = None
    # After a stop signal, a rank that makes no progress for this long (a collective whose peers are gone, as
    # when torchrun restarts the group after a lost worker) exits at once instead of waiting for them.
    stop_grace_seconds: float = 60.0
    # Write checkpoints in the background: the state is staged to CPU memory at the step, training goes on
    # while it is written, at most one save in flight; `latest` moves only once the write is complete.
    async_checkpoint: bool = False


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
    # How long a collective may wait before the run ends with one line naming the ranks that did not
    # arrive (distributed/watchdog.py); overrides timeout_minutes when set (seconds, e.g. for tests).
    timeout_seconds: Optional[float] = None
    # Pipeline parallelism (distributed/pipeline.py): degree, schedule (gpipe, 1f1b, interleaved_1f1b,
    # interleaved_zero_bubble), micro-batches per step and data-parallel rank (null: local batch /
    # training.micro_batch_size), stages per rank (interleaved schedules), blocks on the first / last stage
    # (null: an even split).
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: Optional[int] = None
    pp_stages_per_rank: int = 1
    pp_first_stage_layers: Optional[int] = None
    pp_last_stage_layers: Optional[int] = None

    @property
    def timeout_s(self) -> float:
        return float(self.timeout_seconds) if self.timeout_seconds is not None else 60.0 * self.timeout_minutes


@dataclass
class LoggingConfig:
    # wandb: a key set here wins; a key left unset (None) leaves the choice to wandb's own environment
    # variable (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_NAME, WANDB_TAGS, WANDB_DIR),
    # and only when that is unset too does our default apply: mode offline, project polycom_lm, group the
    # experiment name, run name and folder the run's output folder. The activation and model family are
    # always added to the tags.
    wandb_mode: Optional[Literal["offline", "online", "disabled"]] = None
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_tags: Optional[list[str]] = None
    wandb_dir: Optional[str] = None
    tensorboard: bool = False
    progress_bar: bool = True
    log_activation_coefficients: bool = True  # PolyNorm / PolyReLU coefficients of every layer, every log step


@dataclass
class DownstreamEvaluationConfig:
    """Zero-shot tasks (`polycom-lm eval`'s) scored during training; rows `kind: downstream`."""

    tasks: list[str] = field(default_factory=list)  # e.g. [hellaswag, arc_easy]; empty: off
    every_steps: int = 0  # 0: only after the final step (which is always evaluated)
    limit: Optional[int] = None  # first N examples of each task; None: all
    data_dir: Optional[str] = None  # local task files (layout of shared/data/eval); None: the Hugging Face hub
    batch_size: int = 32  # requests per forward

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"evaluation.downstream.every_steps must be >= 0, got {self.every_steps}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"evaluation.downstream.limit must be at least 1 or null, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluation.downstream.batch_size must be at least 1, got {self.batch_size}")


@dataclass
class EvaluationConfig:
    micro_batch_size: Optional[int] = None  # None: training.micro_batch_size
    max_tokens: Optional[int] = None  # cap per validation set; None: the whole set
    downstream: DownstreamEvaluationConfig = field(default_factory=DownstreamEvaluationConfig)


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
