"""The training loop: one optimizer step at a time, everything else in callbacks.

A step reads this rank's slice of the global batch (`PackedDataset.global_batch`), splits it into
micro-batches, and for each runs forward + backward under the engine's micro-batch context. The local loss
is the *sum* of this rank's token losses divided by the number of target tokens in the whole global batch
(all-reduced), times `dp_world_size` because engines average gradients: the update equals the
single-process update on the whole batch, and the logged loss is the exact global mean. MoE auxiliary
losses (`model.last_aux_losses`, already weighted per micro-batch) are averaged over micro-batches.
Under pipeline parallelism (`engine.pipeline`) the library's schedule runs the micro-batches instead, with
the same loss function and normalisation (`distributed/pipeline.py`); everything else is this step.

Non-finite loss or gradient norm: `skip` drops the update (the batch still counts as consumed) and counts
it, and escalates to a stop after `training.max_consecutive_skips` in a row; `stop` saves a checkpoint of
the last good state and raises `TrainingStopped`. Either way the non-finite step's row is logged first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from polycom_lm.config import Config
from polycom_lm.distributed.engine import Engine
from polycom_lm.distributed.watchdog import PeerStopped, Progress, Watchdog, is_collective_failure
from polycom_lm.errors import PolycomError, first_line
from polycom_lm.faults import step_fault
from polycom_lm.models.lm_head import IGNORE_INDEX
from polycom_lm.train.metrics import model_metrics
from polycom_lm.train.trainer_state import TrainerState
from polycom_lm.train.optim import Schedule, schedule_progress, set_learning_rate
from polycom_lm.train.stop import StopReason, StopRequests
from polycom_lm.train.validation import BatchLayout

logger = logging.getLogger(__name__)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (nats, float32): logits [batch, seq, vocab] (any float dtype, upcast to
    float32), targets [batch, seq] int64 with `IGNORE_INDEX` for tokens that do not count."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )


class TrainingStopped(PolycomError):
    """Training ended early by policy (non-finite loss with `training.on_nonfinite: stop`)."""


@dataclass
class StepResult:
    """Outcome of one optimizer step (numbers are global over all ranks)."""

    loss: float  # mean token cross-entropy over the global batch, nats
    grad_norm: float  # global L2 norm before clipping
    lr: float
    tokens: int  # tokens in this step's global batch
    step_time_s: float
    data_wait_s: float  # time spent getting this rank's batch
    finite: bool
    aux_losses: dict[str, float] = field(default_factory=dict)


class Callback:
    """Hooks into the loop. Every rank calls every hook (collectives inside them stay in lock-step)."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer") -> None: ...

    def on_log(self, trainer: "Trainer", row: dict[str, Any]) -> None:
        """A training metrics row (`kind: train`) every `log_every_steps`."""

    def on_evaluation(self, trainer: "Trainer", rows: list[dict[str, Any]]) -> None:
        """Validation rows (`kind: eval`), one per validation set."""

    def on_downstream_evaluation(self, trainer: "Trainer", rows: list[dict[str, Any]]) -> None:
        """Zero-shot task rows (`kind: downstream`), one per task and metric."""

    def on_step_end(self, trainer: "Trainer") -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def close(self) -> None:
        """Release files and services; called once, also after an error."""


class Trainer:
    """Runs `config.training.max_steps` optimizer steps through `engine`, starting from `state`."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        layout: BatchLayout,
        dataset: Any,
        state: TrainerState,
        schedule: Schedule,
        callbacks: list[Callback],
        *,
        flops_per_token: float,
        peak_flops_per_device: float,
        world_size: int,
        barrier: Callable[[], None],
        save_checkpoint: Callable[["Trainer"], None],
    ):
        self.config = config
        self.engine = engine
        self.layout = layout
        self.dataset = dataset
        self.state = state
        self.schedule = schedule
        self.callbacks = callbacks
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.world_size = world_size
        self.barrier = barrier
        self._save_checkpoint = save_checkpoint
        self.last_saved_step: Optional[int] = None
        self.last_result: Optional[StepResult] = None
        # Cluster life: what this rank is doing (read by the watchdog thread), the stop signals and time
        # budget, and why training stopped early (None: it ran to max_steps).
        self.progress = Progress()
        self.watchdog: Optional[Watchdog] = None
        self.stop_requests: Optional[StopRequests] = None
        self.stopped: Optional[StopReason] = None
        device_type = engine.device.type
        # With `training.compile`, the loss is one compiled region too: the float32 upcast, log-softmax,
        # gather and (in backward) softmax minus one-hot become one pass over the logits instead of
        # five (2048 x 8192 logits, forward + backward, 2 CPU cores: 66 -> 30 ms in fp32, 98 -> 21 ms bf16).
        self._fused_loss = config.training.cross_entropy == "fused"
        self._compiled_loss = torch.compile(token_loss_sum) if config.training.compile and not self._fused_loss else None
        self._autocast = lambda: torch.autocast(
            device_type=device_type, dtype=torch.bfloat16, enabled=config.training.precision == "bf16"
        )

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        """Train to `max_steps`, or until every rank agrees to stop early (`self.stopped` says why). A step
        that raises on this rank is reported to the other ranks first, so that they stop instead of waiting
        for the timeout; a collective that failed because another rank failed becomes `PeerStopped`."""
        try:
            self._fit()
        except BaseException as error:
            if self.watchdog is None or isinstance(error, (KeyboardInterrupt, PeerStopped)):
                raise
            peer = self.watchdog.peer_abort()
            if peer is not None and not isinstance(error, PolycomError):
                self.watchdog.acknowledge()
                raise PeerStopped(f"stopped because {peer}") from None
            self.watchdog.report_failure(f"{type(error).__name__}: {first_line(error)}")
            if is_collective_failure(error):  # a peer vanished (killed, its node lost): no traceback for that
                raise PeerStopped(
                    f"rank {self.engine.mesh.rank}: a collective in '{self.progress.phase}' of step {self.progress.step} "
                    f"failed ({first_line(error)}): another rank stopped; torchrun restarts the group from the last "
                    f"checkpoint while --max-restarts allows", printed_elsewhere=False) from None
            raise

    def _fit(self) -> None:
        training = self.config.training
        for callback in self.callbacks:
            callback.on_train_start(self)
        if self.stop_requests is not None:
            self.stop_requests.start()
        window: list[StepResult] = []
        window_start = time.perf_counter()
        consecutive_skips = 0
        while self.state.step < training.max_steps:
            for callback in self.callbacks:
                callback.on_step_start(self)
            result = self.train_step()
            self.last_result = result
            window.append(result)
            consecutive_skips = 0 if result.finite else consecutive_skips + 1
            stopping = not result.finite and (
                training.on_nonfinite == "stop" or consecutive_skips >= training.max_consecutive_skips
            )
            due = self.state.step % training.log_every_steps == 0 or self.state.step == training.max_steps
            if due or stopping:
                elapsed = time.perf_counter() - window_start
                row = self.training_row(window, elapsed)
                for callback in self.callbacks:
                    callback.on_log(self, row)
                window = []
                window_start = time.perf_counter()
            if not result.finite:
                self._handle_nonfinite(result, consecutive_skips, stopping)
            self.progress.enter("evaluation, logging and checkpoints")
            for callback in self.callbacks:
                callback.on_step_end(self)
            if self.stop_requests is not None and not self.is_last_step():
                self.progress.enter("stop decision")
                self.stopped = self.stop_requests.decide(self.state.step, self.engine.all_reduce_max_world, self.engine.device)
                if self.stopped is not None:
                    logger.warning("stopping after step %d (%s): saving a checkpoint", self.state.step, self.stopped.describe())
                    self.stop_requests.saving = True
                    self.save_checkpoint()
                    return
        for callback in self.callbacks:
            callback.on_train_end(self)

    def save_checkpoint(self) -> None:
        """Save model, optimizer and trainer state at the current step (all ranks call this)."""
        if self.last_saved_step == self.state.step:
            return
        self.progress.enter("checkpoint")
        start = time.perf_counter()
        self._save_checkpoint(self)
        if self.stop_requests is not None:
            self.stop_requests.record_save(time.perf_counter() - start)
        self.last_saved_step = self.state.step

    def is_last_step(self) -> bool:
        return self.state.step >= self.config.training.max_steps

    def autocast(self):
        return self._autocast()

    # ------------------------------------------------------------------------------------------ step
    def train_step(self) -> StepResult:
        engine, layout, state = self.engine, self.layout, self.state
        step_number = state.step + 1
        progress = schedule_progress(self.config.schedule, step_number, layout.tokens_per_step)
        lr = self.config.optimizer.lr * self.schedule.multiplier(progress)
        set_learning_rate(engine.optimizer, lr)
        self.progress.enter("data", step_number)
        start = time.perf_counter()
        batch = self.dataset.global_batch(
            state.consumed_samples, layout.global_batch_size, engine.dp_rank, layout.dp_world_size
        )
        step_fault(engine.mesh.rank, step_number)  # tests' stalls, kills and failures (polycom_lm/faults.py)
        data_wait = time.perf_counter() - start
        tokens = batch["input_ids"].to(engine.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        document_ids = batch.get("document_ids")
        if document_ids is not None:
            document_ids = document_ids[:, :-1].to(engine.device, non_blocking=True)

        # Normalise by the global number of target tokens, not by an average of micro-batch means.
        local_count = (targets != IGNORE_INDEX).sum().to(torch.float64)
        self.progress.enter("token count all-reduce")
        global_count = engine.all_reduce_sum(local_count).clamp(min=1.0)
        scale = layout.dp_world_size / global_count
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        aux_names: list[str] = []
        aux_sum: Optional[torch.Tensor] = None
        model = engine.model
        unwrapped = engine.unwrapped_model()
        if engine.pipeline is not None:  # the schedule runs the micro-batches (distributed/pipeline.py)
            self.progress.enter("pipeline schedule")
            loss_sum, aux_names, aux_sum = self._pipeline_micro_batches(inputs, targets, document_ids, scale)
        own_micro_batches = layout.accumulation_steps if engine.pipeline is None else 0
        for index in range(own_micro_batches):
            rows = slice(index * layout.micro_batch_size, (index + 1) * layout.micro_batch_size)
            with engine.micro_batch_context(index == layout.accumulation_steps - 1):
                kwargs = {} if document_ids is None else {"document_ids": document_ids[rows]}
                if self._fused_loss:  # the model returns the summed loss; no logits are kept
                    kwargs.update(targets=targets[rows], loss_chunk_tokens=self.config.training.cross_entropy_chunk_tokens)
                self.progress.enter("forward")
                with self.autocast():
                    out = model(inputs[rows], **kwargs)
                if self._fused_loss:
                    token_losses = out
                else:
                    # Sharded (DTensor) logits of tensor-parallel plans stay on the eager path.
                    compiled = self._compiled_loss is not None and type(out) is torch.Tensor
                    token_losses = (self._compiled_loss if compiled else token_loss_sum)(out, targets[rows])
                loss = token_losses * scale.to(token_losses.dtype)
                aux_losses = getattr(unwrapped, "last_aux_losses", None)
                if aux_losses:
                    aux_names = sorted(aux_losses)
                    aux_vector = torch.stack([aux_losses[name].float() for name in aux_names])
                    loss = loss + aux_vector.sum() / layout.accumulation_steps
                    detached = aux_vector.detach().to(torch.float64) / layout.accumulation_steps
                    aux_sum = detached if aux_sum is None else aux_sum + detached
                self.progress.enter("backward")
                engine.backward(loss)
            loss_sum += token_losses.detach().to(torch.float64)
            del out, loss

        self.progress.enter("gradient norm")
        grad_norm = engine.clip_grad_norm(self.config.optimizer.grad_clip_norm)
        self.progress.enter("loss all-reduce")
        # One collective and one host sync per step: loss sum and (averaged) auxiliary losses.
        reduced_parts = [loss_sum.reshape(1)]
        if aux_sum is not None:
            reduced_parts.append(aux_sum / layout.dp_world_size)
        reduced = engine.all_reduce_sum(torch.cat(reduced_parts))
        numbers = torch.cat([reduced, grad_norm.detach().to(torch.float64).reshape(1).to(reduced.device)]).tolist()
        loss_value = numbers[0] / float(global_count.item())
        grad_norm_value = numbers[-1]
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
        self.progress.enter("optimizer step")
        if finite:
            engine.optimizer_step()
        engine.zero_grad()
        step_tokens = layout.global_batch_size * layout.seq_len
        state.step += 1
        state.consumed_samples += layout.global_batch_size
        state.tokens += step_tokens
        if not finite:
            state.skipped_steps += 1
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return StepResult(
            loss=loss_value,
            grad_norm=grad_norm_value,
            lr=lr,
            tokens=step_tokens,
            step_time_s=time.perf_counter() - start,
            data_wait_s=data_wait,
            finite=finite,
            aux_losses=dict(zip(aux_names, numbers[1:-1])),
        )

    def _pipeline_micro_batches(self, inputs, targets, document_ids, scale):
        """The pipeline's forward and backward of this rank's batch with the loss of the loop above:
        (summed token loss, auxiliary loss names, their mean over micro-batches), all stages included."""
        def losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            compiled = self._compiled_loss is not None and type(logits) is torch.Tensor
            token_losses = (self._compiled_loss if compiled else token_loss_sum)(logits, target)
            return token_losses, token_losses * scale.to(token_losses.dtype)

        with self.autocast():
            return self.engine.pipeline.train_step_micro_batches(inputs, targets, document_ids, losses)

    def _handle_nonfinite(self, result: StepResult, consecutive: int, stopping: bool) -> None:
        message = (
            f"non-finite loss or gradient norm at step {self.state.step} "
            f"(loss={result.loss}, grad_norm={result.grad_norm})"
        )
        if not stopping:
            logger.warning("%s: update skipped (%d skipped so far)", message, self.state.skipped_steps)
            return
        # The update was not applied, so the weights are the last good ones: save them, then stop.
        self.save_checkpoint()
        where = f"saved the last good state at step {self.state.step} in {self.config.training.output_dir}/checkpoints"
        if self.config.training.on_nonfinite == "stop":
            raise TrainingStopped(f"{message}; {where}; lower optimizer.lr or set training.on_nonfinite=skip")
        raise TrainingStopped(
            f"{message}, the {consecutive}th in a row (training.max_consecutive_skips="
            f"{self.config.training.max_consecutive_skips}); {where}; lower optimizer.lr"
        )

    # ------------------------------------------------------------------------------------------ metrics
    def training_row(self, window: list[StepResult], elapsed_s: float) -> dict[str, Any]:
        last = window[-1]
        window_tokens = sum(result.tokens for result in window)
        tokens_per_s = window_tokens / max(elapsed_s, 1e-9)
        achieved = self.flops_per_token * tokens_per_s
        if achieved > self.peak_flops_per_device * self.world_size:
            # The run's own matmuls beat the start-up probe (it ran while other work did): the probe was low.
            self.peak_flops_per_device = achieved / self.world_size
            logger.info("MFU peak raised to the rate this run achieved, %.1f GFLOP/s per device",
                        self.peak_flops_per_device / 1e9)
        row: dict[str, Any] = {
            "kind": "train",
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": last.loss,
            "lr": last.lr,
            "grad_norm": last.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": achieved / (self.peak_flops_per_device * self.world_size),
            "step_time_s": sum(result.step_time_s for result in window) / len(window),
            "data_wait_s": sum(result.data_wait_s for result in window) / len(window),
            "skipped_steps": self.state.skipped_steps,
        }
        row.update({f"aux/{name}": value for name, value in last.aux_losses.items()})
        metrics = model_metrics(
            self.engine.unwrapped_model(), self.engine.device, self.config.logging.log_activation_coefficients
        )
        if self.engine.pipeline is not None:  # each stage owns some layers' coefficients and statistics
            metrics = self.engine.pipeline.merge_metrics(metrics)
        row.update(metrics)
        return row
