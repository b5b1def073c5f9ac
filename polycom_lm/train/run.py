"""`run_training(config)`: config → data → model → engine → trainer with callbacks → outputs.

Every rank runs this (alone, or under torchrun). The order is chosen so that bad input fails before
anything is written: config values are validated and the output folder is planned (read-only) first;
only then are process groups, data caches, models and files created.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from polycom_lm.checkpoint.async_save import AsyncCheckpointer, checkpoint_group, group_barrier
from polycom_lm.checkpoint.folders import begin_checkpoint, finish_checkpoint, write_checkpoint
from polycom_lm.config import Config
from polycom_lm.distributed.engine import Engine
from polycom_lm.distributed.parallelize import build_engine, parallelize
from polycom_lm.distributed.watchdog import Watchdog
from polycom_lm.errors import ConfigError
from polycom_lm.train import trainer_state
from polycom_lm.train.callbacks import (
    CheckpointCallback,
    DownstreamEvaluationCallback,
    EvaluationCallback,
    MetricsFileCallback,
    ProfilerCallback,
    TensorBoardCallback,
    WandbCallback,
)
from polycom_lm.train.callbacks.wandb import wandb_mode
from polycom_lm.train.data_position import load_data_position, save_data_position
from polycom_lm.train.flops import peak_flops, training_flops_per_token
from polycom_lm.train.loop import Callback, Trainer
from polycom_lm.train.optim import build_optimizer, build_schedule
from polycom_lm.train.stop import StopReason, StopRequests
from polycom_lm.train.output import CHECKPOINTS_DIR, METRICS_FILE, RunLock, plan_output, prepare_output
from polycom_lm.train.validation import validate_config

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    metrics_path: Path
    checkpoints_dir: Path
    final_step: int
    last_train_row: Optional[dict[str, Any]] = None
    final_evaluation: list[dict[str, Any]] = field(default_factory=list)
    stopped: Optional[StopReason] = None  # why training stopped before max_steps (a checkpoint was saved)


def resolve_device(name: str) -> torch.device:
    """`auto` → this process's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device={name} but CUDA is not available; use training.device=cpu")
        torch.cuda.set_device(device)
    return device


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _EvaluationRecorder(Callback):
    """Keeps the last evaluation and training rows for the run's result."""

    def __init__(self) -> None:
        self.evaluation: list[dict[str, Any]] = []
        self.train_row: Optional[dict[str, Any]] = None

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.train_row = row

    def on_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        self.evaluation = rows

    def record_evaluation(self, rows: list[dict[str, Any]]) -> None:
        self.evaluation = rows


def _logged_evaluation(metrics_path: Path, step: int) -> Optional[tuple[int, list[dict[str, Any]]]]:
    """Evaluation rows a previous process logged at `step` (it evaluates before it checkpoints)."""
    from polycom_lm.train.callbacks.metrics_file import read_metrics

    if step == 0 or not metrics_path.is_file():
        return None
    rows = [row for row in read_metrics(metrics_path) if row.get("kind") == "eval" and row.get("step") == step]
    return (step, rows) if rows else None


def setup_model(config: Config, engine: Engine) -> None:
    """Build the model as `polycom-lm train` does and parallelise it onto `engine` with the optimizer:
    seeded init (identical on every rank), bf16 parameters if asked, then `parallelize`."""
    from polycom_lm.models import build_model

    trainer_state.seed_everything(config.training.seed)
    model = build_model(config.model, device=engine.device)
    if config.training.param_dtype == "bf16":
        model = model.to(torch.bfloat16)  # no fp32 master weights
    parallelize(model, config, engine, lambda module: build_optimizer(module, config.optimizer))


def build_trainer(config: Config, dataset: Any, device: Optional[torch.device] = None) -> Trainer:
    """A single-process Trainer over `dataset` (anything with `global_batch(...)`) with exactly the training
    step of `polycom-lm train` (engine, optimizer, precision, checkpointing, compile), but no output folder,
    callbacks or checkpoints: for benchmarks (`trainer.train_step()`) and tests."""
    layout = validate_config(config, 1)
    device = device or resolve_device(config.training.device)
    engine = build_engine(config, device)
    setup_model(config, engine)
    return Trainer(
        config, engine, layout, dataset, trainer_state.TrainerState(),
        build_schedule(config.schedule, config.training.max_steps, layout.tokens_per_step), [],
        flops_per_token=training_flops_per_token(config.model, config.training.seq_len),
        peak_flops_per_device=float("nan"), world_size=1, barrier=_barrier, save_checkpoint=lambda trainer: None,
    )


def run_training(
    config: Config,
    *,
    resume: Optional[str] = None,
    overwrite: bool = False,
    extra_callbacks: tuple[Callback, ...] = (),
    trust_checkpoint: bool = False,
) -> RunResult:
    """Train according to `config`; see `polycom_lm.train.output.plan_output` for `resume` / `overwrite`.

    `extra_callbacks` run on the main process only (the CLI passes its progress bar). `trust_checkpoint`:
    the user vouches for the checkpoint resumed from (see `Engine.load_checkpoint`).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_config(config, world_size)
    plan = plan_output(config, resume, overwrite)
    downstream = DownstreamEvaluationCallback.build(config)  # task names and files fail here, before any write
    resume_state = trainer_state.read_trainer_state(plan.resume_from) if plan.resume_from else None
    device = resolve_device(config.training.device)

    stop_requests = StopRequests(config.training.stop_signals, config.training.time_limit)
    peak = peak_flops(device, config.training.precision)  # a bad POLYCOM_LM_PEAK_FLOPS fails before any write
    engine = build_engine(config, device)
    callbacks: list[Callback] = []
    dataset = None
    watchdog: Optional[Watchdog] = None
    lock = RunLock(plan.output_dir)
    async_checkpointer = AsyncCheckpointer(stop_requests.record_save) if config.training.async_checkpoint else None
    try:
        rank = _global_rank()
        is_main = rank == 0
        from polycom_lm.data import build_train_dataset, check_vocab, load_tokenizer, prepare_run_data

        # A missing data folder or a vocabulary mismatch fails before the output folder is touched.
        data = prepare_run_data(config.data, is_main_process=is_main, barrier=_barrier)
        check_vocab(data.vocab_size, config.model.vocab_size, "model.vocab_size")
        _verify_shards(data, config, is_main)
        dataset = build_train_dataset(
            data.train, data.tokenizer_dir, config.training.seq_len, config.training.seed,
            document_ids=config.data.document_masks, shuffle=config.data.shuffle, workers=config.data.stream_workers,
        )

        setup_model(config, engine)

        state = trainer_state.TrainerState(world_size=world_size)
        rng = None
        if plan.resume_from is not None:
            state, rng = _resume(engine, plan.resume_from, rank, world_size, trust_checkpoint)
            load_data_position(plan.resume_from, dataset, rank)  # a stream's position (PackedDataset has none)
        # Only now, with data, model and checkpoint known to be good, does the output folder change, under
        # the run lock, after checking that nothing changed it since it was planned.
        if is_main:
            lock.acquire()
            if plan_output(config, resume, overwrite) != plan:
                raise ConfigError(
                    f"training.output_dir {plan.output_dir} changed while this run was starting (another run "
                    f"used it); start again"
                )
            prepare_output(plan, config, state.step, tokenizer=load_tokenizer(data.tokenizer_dir))
        _barrier()

        output_dir = plan.output_dir
        checkpoints_dir = output_dir / CHECKPOINTS_DIR
        recorder = _EvaluationRecorder()
        if is_main:
            callbacks.append(MetricsFileCallback(output_dir / METRICS_FILE))
            if wandb_mode(config.logging) != "disabled":  # the config's mode, else WANDB_MODE, else offline
                callbacks.append(WandbCallback(config, output_dir))
            if config.logging.tensorboard:
                callbacks.append(TensorBoardCallback(output_dir / "tensorboard"))
            callbacks.extend(extra_callbacks)
        callbacks.append(recorder)
        evaluated = _logged_evaluation(output_dir / METRICS_FILE, state.step) if plan.resume_from else None
        callbacks.append(EvaluationCallback(data.validation, evaluated))
        if downstream is not None:
            callbacks.append(downstream.bind(data.tokenizer_dir))
        callbacks.append(CheckpointCallback())
        if config.training.profile_start_step is not None:
            callbacks.append(
                ProfilerCallback(output_dir / "profile", config.training.profile_start_step,
                                 config.training.profile_num_steps, rank)
            )
        if plan.resume_from is not None:
            # Last of all start hooks, so that nothing (wandb's start-up, the MFU probe) draws from the
            # restored streams before the first step.
            callbacks.append(_RestoreRNG(rng, state, rank, world_size, config.training.seed))

        save_group = checkpoint_group() if async_checkpointer is not None else None

        def save(trainer: Trainer) -> None:
            trainer.state.world_size = world_size
            step, keep_last = trainer.state.step, config.training.keep_last_checkpoints
            if async_checkpointer is not None:
                async_checkpointer.wait()  # at most one save in flight
                folder = begin_checkpoint(checkpoints_dir, step, rank=rank, barrier=_barrier)
                trainer_state.write_trainer_files(folder, trainer.state, rank)
                save_data_position(folder, dataset, rank)
                upload = engine.save_checkpoint_async(folder, save_group)
                async_checkpointer.submit(step, upload, lambda: finish_checkpoint(
                    checkpoints_dir, step, rank=rank, barrier=group_barrier(save_group), keep_last=keep_last))
                return

            def write_contents(folder: Path) -> None:
                engine.save_checkpoint(folder)
                trainer_state.write_trainer_files(folder, trainer.state, rank)
                save_data_position(folder, dataset, rank)  # a stream's position (PackedDataset has none)

            write_checkpoint(checkpoints_dir, step, write_contents, rank=rank, barrier=_barrier, keep_last=keep_last)

        flops_per_token = training_flops_per_token(config.model, config.training.seq_len)
        trainer = Trainer(
            config, engine, layout, dataset, state,
            build_schedule(config.schedule, config.training.max_steps, layout.tokens_per_step),
            callbacks,
            flops_per_token=flops_per_token,
            peak_flops_per_device=peak.flops_per_second,
            world_size=world_size,
            barrier=_barrier,
            save_checkpoint=save,
        )
        if resume_state is not None:
            trainer.last_saved_step = state.step  # do not re-save the checkpoint we started from
        trainer.stop_requests = stop_requests
        if world_size > 1:
            watchdog = trainer.watchdog = Watchdog(trainer.progress, config.distributed.timeout_s, rank, world_size,
                                                   stop_requests=stop_requests,
                                                   stop_grace_s=config.training.stop_grace_seconds).start()
        stop_requests.install()
        logger.info(
            "training %s (%s) for %d steps: %d sequences x %d tokens per step, %d micro-batches of %d per rank "
            "on %d rank(s), %s",
            config.experiment, config.model.activation, config.training.max_steps, layout.global_batch_size,
            layout.seq_len, layout.accumulation_steps, layout.micro_batch_size, world_size, device,
        )
        trainer.fit()
        if async_checkpointer is not None:
            async_checkpointer.wait()  # the last checkpoint is complete before the run says it is done
        return RunResult(output_dir, output_dir / METRICS_FILE, checkpoints_dir, state.step,
                         recorder.train_row, recorder.evaluation, trainer.stopped)
    finally:
        try:
            if async_checkpointer is not None:
                async_checkpointer.close()
            if watchdog is not None:
                watchdog.close()
            for callback in callbacks:
                try:
                    callback.close()
                except Exception:  # closing one sink must not hide the error that ended training
                    logger.exception("closing %s failed", type(callback).__name__)
            if dataset is not None:
                dataset.close()  # a streaming dataset's reader and tokeniser processes
            lock.release()
            engine.close()
        finally:
            # Last: a stop signal during this clean-up is still the run's (the CLI then ignores further ones).
            stop_requests.uninstall()


def _resume(
    engine, directory: Path, rank: int, world_size: int, trust_checkpoint: bool
) -> tuple[trainer_state.TrainerState, Optional[dict]]:
    """Load model, optimizer and trainer state, and read this rank's RNG states (restored later, by
    `_RestoreRNG`, when nothing else will draw from them before the first step)."""
    state = trainer_state.read_trainer_state(directory)
    rng = trainer_state.load_resume_rng(directory, state, rank, world_size)
    engine.load_checkpoint(directory, trust_checkpoint=trust_checkpoint)
    logger.info("resumed from %s at step %d (%d tokens, %d samples consumed)",
                directory, state.step, state.tokens, state.consumed_samples)
    return state, rng


class _RestoreRNG(Callback):
    """Restores every rank's RNG states from the checkpoint resumed from, as the last start hook."""

    def __init__(self, rng: Optional[dict], state: trainer_state.TrainerState, rank: int, world_size: int, seed: int):
        self.arguments = (rng, trainer_state.TrainerState(**vars(state)), rank, world_size, seed)

    def on_train_start(self, trainer: Trainer) -> None:
        trainer_state.restore_rng_for_resume(*self.arguments)


def _verify_shards(data, config: Config, is_main: bool) -> None:
    """Token ids within the model's vocabulary and shard files that match their manifests' digests, checked
    by the main process (hashing at most once per file version), before any step."""
    from polycom_lm.data.shards import verify_shard

    if is_main:
        # Streamed sources have no shard files; their tokenizer's vocabulary is checked by check_vocab.
        paths = [path for path, _ in data.train if isinstance(path, Path)] + list(data.validation.values())
        for path in paths:
            if verify_shard(path, Path(config.data.cache_dir).expanduser(), config.model.vocab_size):
                logger.info("verified %s against its manifest's sha256", path)
    _barrier()
