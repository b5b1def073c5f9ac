"""Expert parallelism: the experts of every MoE layer split across ranks, tokens sent to them by all-to-all.

Layout. The world of W ranks is cut into W / ep expert-parallel groups of `ep` neighbouring ranks
(ranks [g·ep, (g+1)·ep)). Inside a group, rank i holds experts [i·E/ep, (i+1)·E/ep) of every layer; the
ranks with the same position i in different groups (the "expert-data-parallel" group, W / ep ranks) hold
the same experts and are data parallel for them. Everything else (attention, norms, router, shared
PolyCom coefficients) stays replicated on all W ranks, data parallel as usual. Every rank reads its own
slice of the batch: EP is composed with data parallelism, not a separate dimension of the batch.

Forward of one layer on one rank: route locally → sort the T·k assignments by expert → all-to-all the
rows to the ranks that hold their experts (uneven splits: counts are exchanged first) → regroup the
received rows by local expert → grouped matmuls → the reverse all-to-all → weight and sum per token. Both
all-to-alls are autograd functions whose backward is the reverse exchange, so gradients reach the tokens
and the router on the sending rank.

Gradients. Under the engine contract each rank's loss is scaled so that *averaging* gradients over the W
data-parallel ranks gives the global gradient. A local expert's gradient already sums the contributions
of the tokens of all `ep` ranks of its group; a hook on each expert parameter therefore sums it over the
expert-data-parallel group and divides by W (both before accumulation, so gradient accumulation stays
exact). Data parallelism must not touch these parameters: `apply_expert_parallel` lists them in
`_ddp_params_and_buffers_to_ignore` (the attribute `DistributedDataParallel` reads).

Each expert shard is marked as a local shard of the global `[E, ...]` tensor (`local_shards.py`), placed
`[Replicate(), Shard(0)]` on the `("expert_data", "expert")` mesh: the global gradient norm counts each
expert once, and checkpoints store each expert once, so a run saved with ep=2 resumes with ep=1 (or on
one process) and vice versa.

Limits (`mesh.check_parallel_dims`, `Engine.check_config`): ep > 1 needs `model.family: moe`, ep
dividing both the world size and `moe.num_experts`, tp = 1 (experts are not tensor-sharded) and backend
`ddp`; composing with FSDP (sharding the replicated part, `ignored_params` for the experts) and DeepSpeed
is not done yet and is refused at config time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

from polycom_lm.distributed.local_shards import mark_local_shard
from polycom_lm.errors import ConfigError
from polycom_lm.models.moe_experts import GroupedExperts
from polycom_lm.models.moe_layer import MoEFeedForward, combine_sorted, sort_by_expert

logger = logging.getLogger(__name__)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        output = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        dist.all_to_all_single(output, rows.contiguous(), output_splits, input_splits, group=group)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_rows = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_rows, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_rows, None, None, None


def all_to_all_rows(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware `all_to_all_single` along dim 0: send `input_splits[j]` rows to rank j of `group`,
    receive `output_splits[j]` rows from it."""
    return _AllToAll.apply(rows, output_splits, input_splits, group)


class ExpertParallelDispatcher:
    """The `MoEFeedForward.dispatcher` under expert parallelism (see the module docstring)."""

    def __init__(self, group, ep_size: int, num_experts: int):
        self.group = group
        self.ep_size = ep_size
        self.num_experts = num_experts

    def __call__(
        self, tokens: torch.Tensor, top_experts: torch.Tensor, top_weights: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        """tokens [T, d], top_experts [T, k] (global ids), top_weights [T, k] → [T, d]."""
        local_experts = experts.num_experts
        order, counts = sort_by_expert(top_experts, self.num_experts)
        rows = tokens[order // top_experts.shape[1]]
        # send_counts[j, e]: rows for local expert e of rank j. Exchanged first so every rank knows its
        # receive splits (one small all-to-all; `tolist` is the one host sync the uneven splits need).
        send_counts = counts.view(self.ep_size, local_experts)
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts.contiguous(), group=self.group)
        send_splits = send_counts.sum(dim=1).tolist()
        receive_splits = receive_counts.sum(dim=1).tolist()
        received = all_to_all_rows(rows, receive_splits, send_splits, self.group)
        # Received rows are ordered by (source rank, local expert); the grouped matmul wants them by expert.
        expert_of_row = torch.repeat_interleave(
            torch.arange(local_experts, device=tokens.device).repeat(self.ep_size),
            receive_counts.reshape(-1),
            output_size=received.shape[0],
        )
        local_order = torch.argsort(expert_of_row, stable=True)
        outputs = experts(received[local_order], receive_counts.sum(dim=0))
        inverse = torch.empty_like(local_order)
        inverse[local_order] = torch.arange(local_order.numel(), device=local_order.device)
        returned = all_to_all_rows(outputs[inverse], send_splits, receive_splits, self.group)
        return combine_sorted(returned, order, top_weights)


@dataclass
class ExpertParallel:
    """What `apply_expert_parallel` did: its degree, this rank's place and the sharded parameters."""

    ep_size: int
    ep_rank: int
    mesh: DeviceMesh  # ("expert_data", "expert")
    expert_parameter_names: list[str] = field(default_factory=list)


def shard_experts(experts: GroupedExperts, ep_rank: int, ep_size: int) -> None:
    """Keep experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of `experts` (in place): projections, and per-expert
    coefficients when the layer has them. Call after the weights are initialised (or loaded)."""
    local = experts.num_experts // ep_size
    start = ep_rank * local
    with torch.no_grad():
        experts.in_proj = nn.Parameter(experts.in_proj[start : start + local].clone())
        experts.out_proj = nn.Parameter(experts.out_proj[start : start + local].clone())
        if experts.per_expert_coefficients:
            activation = experts.activation
            activation.weight = nn.Parameter(activation.weight[start : start + local].clone())
            activation.bias = nn.Parameter(activation.bias[start : start + local].clone())
    experts.num_experts = local


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> ExpertParallel:
    """Shard the experts of every MoE layer of `model` over the `"expert"` dim of `mesh` (shape
    (W / ep, ep)) and attach the all-to-all dispatcher. Call on the plain, initialised model, before data
    parallelism wraps it and before the optimizer is built."""
    ep = mesh.size(1)
    world_size = mesh.size()
    ep_rank = mesh.get_local_rank("expert")
    state = ExpertParallel(ep, ep_rank, mesh)
    ep_group = mesh.get_group("expert")
    expert_data_group = mesh.get_group("expert_data") if world_size > ep else None
    placements = (Replicate(), Shard(0))
    for module_name, module in model.named_modules():
        if not isinstance(module, MoEFeedForward):
            continue
        shard_experts(module.experts, ep_rank, ep)
        module.dispatcher = ExpertParallelDispatcher(ep_group, ep, module.num_experts)
        prefix = f"{module_name}.experts." if module_name else "experts."
        for name, parameter in module.experts.named_parameters():
            if name in ("in_proj", "out_proj") or module.experts.per_expert_coefficients:
                state.expert_parameter_names.append(prefix + name)
                mark_local_shard(parameter, mesh, placements)
                parameter.register_hook(_expert_gradient_hook(expert_data_group, world_size))
    if not state.expert_parameter_names:
        raise ConfigError(f"distributed.ep={ep}: the model has no MoE layers to shard")
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + state.expert_parameter_names
    logger.info(
        "expert parallel: ep=%d, this rank holds experts %d/%d of each layer (%d sharded parameter tensors)",
        ep, ep_rank, ep, len(state.expert_parameter_names),
    )
    return state


def _expert_gradient_hook(expert_data_group, world_size: int):
    def hook(gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone()
        if expert_data_group is not None:
            dist.all_reduce(gradient, op=dist.ReduceOp.SUM, group=expert_data_group)
        return gradient.div_(world_size)

    return hook
