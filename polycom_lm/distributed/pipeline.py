"""Pipeline parallelism on `torch.distributed.pipelining` (the library torchtitan uses): the model's blocks
are split into stages over the `pp` ranks of the mesh, and one of the library's schedules runs each step's
micro-batches through them.

What this module owns, in the order `parallelize` uses it:
- `split_model(model, config, pp_rank)` is the first transformation. The full model is built and
  initialised on every rank as without pipelining (so the weights equal one process's); each of this
  rank's stages becomes a *part*: the model with only that stage's blocks kept (`KeptLayers`, keyed by
  their index in the whole model), the embedding on the first stage, the final norm and head on the last,
  the other top-level modules None (`Transformer.hidden_states` passes hidden states through then).
  Parameter names are the whole model's, so checkpoints are in the canonical layout whatever `pp` is.
- Tensor / expert parallelism, activation checkpointing, compile and the engine's data parallelism are then
  applied to each part (`Engine.wrap_stages`).
- `StageModules` is one module over all parts of a rank, with the whole model's names: what the optimizer,
  checkpoints and metrics see (`engine.unwrapped_model()`).
- `Pipeline.train_step_micro_batches` runs the schedule on one step's local batch. The loss function is
  the loop's (sum of token losses × dp / global target tokens) and the schedule is built with
  `scale_grads=False`, so gradients equal the single-process ones (the library's default divides them by
  the micro-batch count once more: torchtitan commit 3e1b843). MoE auxiliary losses reach backward through
  `_AuxLossGradient` on each stage's output (the schedule backpropagates stage outputs only).
- `Pipeline.forward_loss_sum` (validation) and `PipelineForward` (zero-shot tasks scored during training):
  a forward-only schedule over the same modules, one per batch shape (a stage's buffers are sized at its
  first step), separate from the training schedule; the last stage's loss, or its task results
  (`share_from_last_stage`), reach every stage. No weights are gathered onto one rank.

Refused (`check_pipeline_config`, one line each): DeepSpeed, tied embeddings (the embedding and head
live on different stages), the fused cross-entropy, sequence parallelism, `interleaved_zero_bubble` with
data parallelism (wrong gradients, measured), stages without a block, micro-batch counts the schedule
cannot run. Under `backend: ddp` stages are replicated by FSDP2 (`ddp.py` says why).

The gradient norm for clipping sums the squared norms of all stages (`Engine.clip_grad_norm` with the mesh's
pp group); the loop adds every stage's share of the loss, auxiliary losses and metrics (`merge_metrics`).

Layout of the stages (`stage_ids`): stage s of S = pp × stages_per_rank lives on pp rank s mod pp (the
library's loop layout); blocks are split evenly, the remainder to the middle stages, unless
`distributed.pp_first_stage_layers` / `pp_last_stage_layers` fix the first and last (as Megatron's
`--decoder-first/last-pipeline-num-layers`).
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    ScheduleGPipe,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

from polycom_lm.config import Config
from polycom_lm.errors import ConfigError
from polycom_lm.models.moe_layer import moe_metrics_from_layers
from polycom_lm.registry import Registry

logger = logging.getLogger(__name__)

SCHEDULES = Registry("pipeline schedule")
SCHEDULES.register("gpipe")(ScheduleGPipe)
SCHEDULES.register("1f1b")(Schedule1F1B)
SCHEDULES.register("interleaved_1f1b")(ScheduleInterleaved1F1B)
SCHEDULES.register("interleaved_zero_bubble")(ScheduleInterleavedZeroBubble)

# (logits, targets) -> (summed token loss, the loss to backpropagate)
LossFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def is_multi_stage(schedule: str) -> bool:
    """Whether the schedule runs several stages per rank (`distributed.pp_stages_per_rank` >= 2)."""
    return issubclass(SCHEDULES.get(schedule), PipelineScheduleMulti)


def bubble_fraction(schedule: str, pp: int, micro_batches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a step's time on each rank, with forward and backward of one micro-batch on one stage
    taking equal time everywhere: (p − 1) / (m + p − 1) for GPipe and 1F1B; with v stages per rank each
    stage is 1/v of the work, so (p − 1) / (v·m + p − 1) for the interleaved schedules (Megatron's
    (p − 1) / (v·m) of the ideal time). Zero-bubble schedules fill part of it with weight gradients; the
    interleaved formula is their upper bound."""
    if pp <= 1:
        return 0.0
    v = stages_per_rank if is_multi_stage(schedule) else 1
    return (pp - 1) / (v * micro_batches + pp - 1)


def pipeline_summary(config: Config, micro_batches: int) -> dict:
    """The pipeline layout of `config` (pp > 1) with `micro_batches` per step and data-parallel rank: for
    `polycom-lm info` and `config`."""
    distributed = config.distributed
    v = distributed.pp_stages_per_rank
    stages = distributed.pp * v
    counts = stage_layer_counts(config.model.n_layers, stages, distributed.pp_first_stage_layers,
                                distributed.pp_last_stage_layers)
    return {
        "pp": distributed.pp,
        "schedule": distributed.pp_schedule,
        "stages": stages,
        "stages_per_rank": v,
        "layers_per_stage": counts,
        "micro_batches": micro_batches,
        "bubble_fraction": bubble_fraction(distributed.pp_schedule, distributed.pp, micro_batches, v),
    }


def stage_layer_counts(n_layers: int, stages: int, first: Optional[int] = None, last: Optional[int] = None) -> list[int]:
    """Blocks per stage: `first` / `last` when given, the rest split evenly over the other stages, any
    remainder to the middle stages first (the first and last also hold the embedding and the head)."""
    counts = [0] * stages
    fixed = {}
    if first is not None:
        fixed[0] = first
    if last is not None:
        fixed[stages - 1] = last
    free = [index for index in range(stages) if index not in fixed]
    remaining = n_layers - sum(fixed.values())
    for index, count in fixed.items():
        counts[index] = count
    if free:
        base, extra = divmod(remaining, len(free))
        middle_first = [i for i in free if 0 < i < stages - 1] + [i for i in free if i in (0, stages - 1)]
        for position, index in enumerate(middle_first):
            counts[index] = base + (1 if position < extra else 0)
    return counts


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages of pp rank `pp_rank`: r, r + pp, r + 2·pp, ... (the library's loop layout)."""
    return [pp_rank + index * pp for index in range(stages_per_rank)]


def check_pipeline_config(config: Config, world_size: int, dp: int, local_batch: int) -> None:
    """Every pipeline setting that cannot work: one ConfigError naming the key, before any group exists.
    `dp` is the data-parallel size and `local_batch` the sequences per data-parallel rank per step."""
    distributed, model = config.distributed, config.model
    pp = distributed.pp
    if pp == 1:
        return
    if distributed.pp_schedule not in SCHEDULES:
        raise ConfigError("distributed.pp_schedule: " + SCHEDULES.unknown_message(distributed.pp_schedule))
    v = distributed.pp_stages_per_rank
    multi = is_multi_stage(distributed.pp_schedule)
    if multi and v < 2:
        raise ConfigError(
            f"distributed.pp_schedule={distributed.pp_schedule} runs several stages per rank; set "
            f"distributed.pp_stages_per_rank >= 2 (got {v}) or use gpipe / 1f1b"
        )
    if not multi and v != 1:
        raise ConfigError(
            f"distributed.pp_stages_per_rank={v} needs an interleaved schedule (interleaved_1f1b, "
            f"interleaved_zero_bubble); {distributed.pp_schedule} runs one stage per rank"
        )
    stages = pp * v
    counts = stage_layer_counts(model.n_layers, stages, distributed.pp_first_stage_layers, distributed.pp_last_stage_layers)
    if min(counts) < 1 or sum(counts) != model.n_layers:
        raise ConfigError(
            f"model.n_layers={model.n_layers} cannot be split into {stages} pipeline stages (pp={pp} x "
            f"pp_stages_per_rank={v}) of at least one block each with pp_first_stage_layers="
            f"{distributed.pp_first_stage_layers}, pp_last_stage_layers={distributed.pp_last_stage_layers}"
        )
    if model.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true is not supported with distributed.pp > 1 (the embedding and "
                          "the head live on different stages); set model.tie_embeddings=false")
    if distributed.sequence_parallel:
        raise ConfigError("distributed.sequence_parallel is not supported with distributed.pp > 1 yet; set "
                          "distributed.sequence_parallel=false")
    if config.training.cross_entropy == "fused":
        raise ConfigError("training.cross_entropy=fused is not supported with distributed.pp > 1; use "
                          "training.cross_entropy=logits")
    micro_batches = pipeline_micro_batches(config, local_batch)
    if local_batch % micro_batches:
        raise ConfigError(
            f"distributed.pp_microbatches={micro_batches} does not divide the {local_batch} sequences per "
            f"data-parallel rank and step (global batch / {dp} data-parallel ranks)"
        )
    if distributed.pp_schedule == "1f1b" and micro_batches < pp:
        raise ConfigError(f"distributed.pp_schedule=1f1b needs at least pp={pp} micro-batches, got "
                          f"{micro_batches}; raise distributed.pp_microbatches or use gpipe")
    if multi:
        rounds = max(1, micro_batches // pp)
        if micro_batches % rounds:
            raise ConfigError(
                f"distributed.pp_schedule={distributed.pp_schedule} needs a micro-batch count divisible by "
                f"max(1, m // pp) = {rounds}; got pp_microbatches={micro_batches} with pp={pp}"
            )
    if distributed.pp_schedule == "interleaved_zero_bubble" and dp > 1:
        # Measured (torch 2.13, gloo): pp 2 x fsdp 2 gives a first gradient norm of 2.19 against one
        # process's 2.55; with DDP the split weight-gradient pass is wrong too (pytorch #144530).
        raise ConfigError("distributed.pp_schedule=interleaved_zero_bubble gives wrong gradients with data "
                          f"parallelism here ({dp} data-parallel ranks); use interleaved_1f1b, or dp 1")


def global_batch_sequences(config: Config) -> int:
    training = config.training
    return training.global_batch_tokens // training.seq_len if training.global_batch_tokens else training.global_batch_size


def pipeline_micro_batches(config: Config, local_batch: int) -> int:
    """Micro-batches per step and data-parallel rank: `distributed.pp_microbatches`, else the loop's
    accumulation steps (local batch / `training.micro_batch_size`)."""
    if config.distributed.pp_microbatches is not None:
        if config.distributed.pp_microbatches < 1:
            raise ConfigError(f"distributed.pp_microbatches must be positive, got {config.distributed.pp_microbatches}")
        return config.distributed.pp_microbatches
    return max(1, local_batch // config.training.micro_batch_size)


class KeptLayers(nn.ModuleDict):
    """The blocks a pipeline stage keeps, keyed by their index in the whole model ("0".."N-1", the names
    `nn.ModuleList` gives), so parameter names do not change; iterates over the blocks like the list."""

    def __iter__(self):
        return iter(self.values())


def _prune(part: nn.Module, layer_indices: range, is_first: bool, is_last: bool) -> nn.Module:
    part.layers = KeptLayers({str(index): part.layers[index] for index in layer_indices})
    if not is_first:
        part.tok_embeddings = None
    if not is_last:
        part.norm = None
        part.output = None
    return part


def split_model(model: nn.Module, config: Config, pp_rank: int) -> list[tuple[int, nn.Module]]:
    """This rank's (stage id, part) pairs, cut from the built, initialised `model` (which becomes the first
    part; further parts of interleaved schedules are copies)."""
    distributed = config.distributed
    pp, v = distributed.pp, distributed.pp_stages_per_rank
    stages = pp * v
    counts = stage_layer_counts(config.model.n_layers, stages, distributed.pp_first_stage_layers,
                                distributed.pp_last_stage_layers)
    starts = [sum(counts[:index]) for index in range(stages)]
    mine = stage_ids(pp_rank, pp, v)
    originals = [model] + [copy.deepcopy(model) for _ in mine[1:]]
    parts = []
    for stage, part in zip(mine, originals):
        layers = range(starts[stage], starts[stage] + counts[stage])
        parts.append((stage, _prune(part, layers, stage == 0, stage == stages - 1)))
        logger.info("pipeline stage %d of %d on pp rank %d: blocks %d..%d%s%s", stage, stages, pp_rank,
                    layers.start, layers.stop - 1, ", embedding" if stage == 0 else "",
                    ", norm + head + loss" if stage == stages - 1 else "")
    return parts


class StageModules(nn.Module):
    """All of one rank's stage parts as one module with the whole model's names (`tok_embeddings`,
    `layers.<i>`, `norm`, `output` where this rank holds them): the optimizer, checkpoints and metrics use
    it. It has no forward of its own; `Pipeline` runs the parts."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.config = parts[0].config
        self.rope = parts[0].rope
        self.tok_embeddings = next((p.tok_embeddings for p in parts if p.tok_embeddings is not None), None)
        self.layers = KeptLayers({key: block for part in parts for key, block in part.layers.items()})
        self.norm = next((p.norm for p in parts if p.norm is not None), None)
        self.output = next((p.output for p in parts if p.output is not None), None)
        object.__setattr__(self, "parts", list(parts))  # not submodules: their children are ours

    def train(self, mode: bool = True) -> "StageModules":
        super().train(mode)
        for part in self.parts:
            part.train(mode)
        return self

    def moe_metrics(self) -> dict[str, float]:
        """Routing statistics of this rank's MoE layers under their index in the whole model."""
        metrics: dict[str, float] = {}
        for key, block in self.layers.items():
            if hasattr(block.ffn, "routing_statistics"):
                for name, value in moe_metrics_from_layers([block.ffn]).items():
                    metrics[name.replace("moe/layer_0/", f"moe/layer_{key}/", 1)] = value
        return metrics


class PipelineForward(nn.Module):
    """`model(input_ids) -> logits` through the pipeline (forward only), for the zero-shot tasks scored
    during training (`wrapped=True` scoring); see `Pipeline.forward_logits`."""

    def __init__(self, pipeline: "Pipeline", stage_modules: StageModules):
        super().__init__()
        self.stage_modules = stage_modules  # its parameters' device and its train/eval mode
        object.__setattr__(self, "pipeline", pipeline)

    def forward(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.pipeline.forward_logits(input_ids, document_ids)


class _AuxLossGradient(torch.autograd.Function):
    """Identity on a stage's output whose backward also gives `aux_loss` the gradient `weight`: the MoE
    auxiliary losses of every stage reach backward although the schedule backpropagates only the stage
    outputs (Megatron's MoEAuxLossAutoScaler, torchtitan PR #3000)."""

    @staticmethod
    def forward(ctx, output, aux_loss, weight: float):  # type: ignore[override]
        ctx.save_for_backward(aux_loss)
        ctx.weight = weight
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.weight), None


class Pipeline:
    """This rank's pipeline stages and the training schedule over them (see the module docstring)."""

    def __init__(self, config: Config, parts: list[tuple[int, nn.Module]], wrapped: list[nn.Module],
                 group: dist.ProcessGroup, device: torch.device, micro_batches: int):
        distributed = config.distributed
        self.num_stages = distributed.pp * distributed.pp_stages_per_rank
        self.n_layers = config.model.n_layers
        self.vocab_size = config.model.vocab_size
        self.micro_batches = micro_batches
        self.group = group
        self.device = device
        self.stage_indices = [stage for stage, _ in parts]
        self.parts = [part for _, part in parts]
        self.wrapped = wrapped
        self.has_first = 0 in self.stage_indices
        self.has_last = self.num_stages - 1 in self.stage_indices
        self._loss_function: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
        self._aux_records: dict[int, list[dict[str, torch.Tensor]]] = {}  # per part, per forward
        self._eval_schedules: dict[tuple, object] = {}
        stages = self._stages()
        schedule_class = SCHEDULES.get(distributed.pp_schedule)
        self.schedule = schedule_class(
            stages if is_multi_stage(distributed.pp_schedule) else stages[0],
            n_microbatches=micro_batches, loss_fn=self._loss, scale_grads=False,
        )
        for part in self.parts:
            if hasattr(part, "weighted_aux_losses"):
                part.register_forward_hook(self._attach_aux_losses)

    def _stages(self) -> list[PipelineStage]:
        return [
            PipelineStage(module, stage, self.num_stages, self.device, group=self.group)
            for stage, module in zip(self.stage_indices, self.wrapped)
        ]

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self._loss_function is not None
        return self._loss_function(output, target)

    def _attach_aux_losses(self, part: nn.Module, args, output):
        aux = getattr(part, "last_aux_losses", None)
        if not aux or not torch.is_grad_enabled():
            return None
        # The model averages over its own layers; the whole model's mean weights each stage by its share.
        share = len(part.layers) / self.n_layers
        records = self._aux_records.setdefault(id(part), [])
        records.append({name: value.detach().to(torch.float64) * share for name, value in aux.items()})
        total = torch.stack([value.float() for value in aux.values()]).sum() * share
        return _AuxLossGradient.apply(output, total, 1.0 / self.micro_batches)

    def train_step_micro_batches(
        self, inputs: torch.Tensor, targets: torch.Tensor, document_ids: Optional[torch.Tensor],
        loss_function: LossFunction,
    ) -> tuple[torch.Tensor, list[str], Optional[torch.Tensor]]:
        """Forward and backward of this rank's local batch (inputs / targets [local batch, seq]) in
        `micro_batches` micro-batches. `loss_function(logits, targets)` returns (summed token loss, the
        loss to backpropagate). Returns, identical on every stage: the summed token loss (float64), the
        auxiliary loss names and their sum over micro-batches / micro-batches (float64) or None."""
        token_sums: list[torch.Tensor] = []

        def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            token_losses, scaled = loss_function(output, target)
            token_sums.append(token_losses.detach().to(torch.float64))
            return scaled

        self._loss_function = loss
        self._aux_records = {}
        kwargs = {} if document_ids is None else {"document_ids": document_ids}
        arguments = (inputs,) if self.has_first else ()
        self.schedule.step(*arguments, target=targets if self.has_last else None, return_outputs=False, **kwargs)
        self._loss_function = None
        # The first step's shape inference runs each stage (and the loss) once more, on the first
        # micro-batch: count the schedule's own `micro_batches` calls (the last ones) only.
        token_sums = token_sums[-self.micro_batches:]
        records = [record for forwards in self._aux_records.values() for record in forwards[-self.micro_batches:]]
        names = sorted(records[0]) if records else []
        parts = [torch.stack(token_sums).sum().reshape(1) if token_sums else torch.zeros(1, dtype=torch.float64, device=self.device)]
        if names:
            aux = torch.stack([torch.stack([record[name] for name in names]) for record in records])
            parts.append(aux.sum(0) / self.micro_batches)
        reduced = torch.cat([part.to(self.device) for part in parts])
        dist.all_reduce(reduced, group=self.group)
        return reduced[0], names, (reduced[1:] if names else None)

    @torch.no_grad()
    def _forward(self, inputs: torch.Tensor, document_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The last stage's output for a whole batch (one micro-batch, forward only; None on other ranks),
        through a forward-only schedule of its own per batch shape (shapes are fixed per stage object)."""
        key = (tuple(inputs.shape), document_ids is not None)
        schedule = self._eval_schedules.get(key)
        if schedule is None:
            if len(self._eval_schedules) >= 8:  # zero-shot batches come in many shapes; keep a few
                self._eval_schedules.pop(next(iter(self._eval_schedules)))
            stages = self._stages()
            schedule = (ScheduleLoopedBFS(stages, n_microbatches=1) if len(stages) > 1
                        else ScheduleGPipe(stages[0], n_microbatches=1))
            self._eval_schedules[key] = schedule
        kwargs = {} if document_ids is None else {"document_ids": document_ids}
        arguments = (inputs,) if self.has_first else ()
        return schedule.step(*arguments, **kwargs)

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] on the last stage; zeros of that shape on the others (whose results
        `share_from_last_stage` replaces)."""
        output = self._forward(input_ids, document_ids)
        if output is None:
            output = torch.zeros(*input_ids.shape[:2], self.vocab_size, device=self.device)
        return output

    def share_from_last_stage(self, value):
        """`value` as the last stage computed it, on every rank of the pipeline (any picklable object)."""
        holder = [value]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(self.group, dist.get_world_size(self.group) - 1),
                                   group=self.group)
        return holder[0]

    @torch.no_grad()
    def forward_loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor, document_ids: Optional[torch.Tensor],
                         loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Summed token loss of a whole batch (one micro-batch, forward only), on every stage (float64)."""
        output = self._forward(inputs, document_ids)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.has_last:
            total += loss_function(output, targets).to(torch.float64)
        dist.all_reduce(total, group=self.group)
        return total[0]

    def merge_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every stage's metrics (coefficients and MoE statistics of the layers it owns) in one dict, the
        same on every rank; for keys every stage has (memory), the largest value."""
        gathered: list[Optional[dict]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, metrics, group=self.group)
        merged: dict[str, float] = {}
        for stage_metrics in gathered:
            for key, value in (stage_metrics or {}).items():
                merged[key] = max(merged[key], value) if key in merged else value
        return merged
