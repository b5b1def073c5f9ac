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
exact). DDP must not touch these parameters: `apply_expert_parallel` lists them in
`_ddp_params_and_buffers_to_ignore` (the attribute `DistributedDataParallel` reads). The global gradient
norm needs the expert part summed over the EP group: `ExpertParallel.grad_norm`.

Limits: ep > 1 needs `model.family: moe`, ep dividing both the world size and `moe.num_experts`,
tp = 1 (experts are not tensor-sharded) and backend `ddp` (`ExpertParallelDDPEngine`); composing with
FSDP (sharding the replicated part, `ignored_params` for the experts) and DeepSpeed is not done yet and
is refused at config time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from polycom_lm.checkpoint.dcp import load_dcp, save_dcp
from polycom_lm.config import Config
from polycom_lm.distributed.ddp import DDPEngine  # ddp.py imports this module lazily: no cycle
from polycom_lm.errors import ConfigError
from polycom_lm.models.moe_experts import GroupedExperts
from polycom_lm.models.moe_layer import MoEFeedForward, combine_sorted, sort_by_expert

logger = logging.getLogger(__name__)


def validate_expert_parallel_config(config: Config, world_size: int) -> None:
    """Reject an `distributed.ep` that cannot work, naming the key and what would be valid."""
    ep = config.distributed.ep
    if ep < 1:
        raise ConfigError(f"distributed.ep must be a positive integer, got {ep}")
    if ep == 1:
        return
    model = config.model
    if model.family != "moe":
        raise ConfigError(f"distributed.ep={ep} needs model.family 'moe', got {model.family!r}; set ep to 1")
    experts = model.moe.num_experts
    if experts % ep:
        valid = ", ".join(str(d) for d in range(1, experts + 1) if experts % d == 0 and world_size % d == 0)
        raise ConfigError(
            f"distributed.ep={ep} does not divide model.moe.num_experts={experts}; valid ep degrees for "
            f"{experts} experts on {world_size} ranks: {valid}"
        )
    if world_size % ep:
        raise ConfigError(
            f"distributed.ep={ep} does not divide the world size {world_size}; "
            f"valid: {', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0 and experts % d == 0)}"
        )
    if config.distributed.tp > 1:
        raise ConfigError("distributed.ep > 1 with distributed.tp > 1 is not supported; use one of them")
    if config.distributed.backend != "ddp":
        raise ConfigError(
            f"distributed.ep > 1 is implemented with distributed.backend 'ddp' (experts sharded by EP, the "
            f"rest replicated), got {config.distributed.backend!r}; set distributed.backend=ddp or ep=1"
        )


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
    """What `apply_expert_parallel` did: its process groups and the names of the sharded parameters."""

    ep_size: int
    ep_rank: int
    world_size: int
    mesh: DeviceMesh
    expert_parameter_names: list[str] = field(default_factory=list)

    @property
    def ep_group(self):
        return self.mesh.get_group("expert")

    @property
    def expert_data_group(self):
        return self.mesh.get_group("expert_data") if self.world_size > self.ep_size else None

    def to_checkpoint_state(self, model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
        """Copies of a `get_state_dict` model and optimizer state whose expert shards are DTensors sharded
        along the expert dim, so DCP writes each expert once and reloads on any ep / world size. The
        inputs are not modified (their inner dicts may be the optimizer's own)."""
        placements = [Replicate(), Shard(0)]
        model_state = dict(model_state)
        optimizer_state = dict(optimizer_state)
        per_parameter_states = dict(optimizer_state.get("state", {}))
        for name in self.expert_parameter_names:
            local = model_state[name]
            model_state[name] = DTensor.from_local(local, self.mesh, placements, run_check=False)
            if name in per_parameter_states:
                per_parameter_states[name] = {
                    key: DTensor.from_local(value, self.mesh, placements, run_check=False)
                    if isinstance(value, torch.Tensor) and value.shape == local.shape
                    else value
                    for key, value in per_parameter_states[name].items()
                }
        if "state" in optimizer_state:
            optimizer_state["state"] = per_parameter_states
        return model_state, optimizer_state

    @staticmethod
    def from_checkpoint_state(state):
        """A copy of `state` with every DTensor replaced by its local shard (the inverse of
        `to_checkpoint_state`)."""
        if isinstance(state, DTensor):
            return state.to_local()
        if isinstance(state, dict):
            return {key: ExpertParallel.from_checkpoint_state(value) for key, value in state.items()}
        return state

    def expert_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.expert_parameter_names]

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Global L2 norm of all gradients: replicated parameters counted once, the expert shards of the
        EP group summed (their gradients are already equal across the expert-data-parallel group)."""
        expert_names = set(self.expert_parameter_names)
        replicated, sharded = [], []
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                (sharded if name in expert_names else replicated).append(parameter.grad)
        device = next(model.parameters()).device
        replicated_square = _sum_of_squares(replicated, device)
        sharded_square = _sum_of_squares(sharded, device)
        dist.all_reduce(sharded_square, op=dist.ReduceOp.SUM, group=self.ep_group)
        return torch.sqrt(replicated_square + sharded_square)

    def clip_grad_norm(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Clip all gradients by the global norm (same factor on every rank); returns the norm before."""
        total_norm = self.grad_norm(model)
        if max_norm is not None and math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, total_norm, foreach=True)
        return total_norm


def _sum_of_squares(gradients: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for gradient in gradients:
        total = total + gradient.detach().float().square().sum()
    return total


def build_expert_parallel_mesh(ep: int, device_type: str) -> DeviceMesh:
    """The 2-D mesh ("expert_data", "expert") of shape (W / ep, ep): row i is the EP group of ranks
    [i·ep, (i+1)·ep); column j (ranks j, j+ep, ...) is an expert-data-parallel group."""
    world_size = dist.get_world_size()
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("expert_data", "expert"))


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


def apply_expert_parallel(model: nn.Module, config: Config) -> Optional[ExpertParallel]:
    """Shard the experts of every MoE layer of `model` over `distributed.ep` ranks and attach the
    all-to-all dispatcher. Returns None (and changes nothing) when ep is 1. Call on the plain, initialised
    model, before wrapping it in DDP / FSDP and before building the optimizer."""
    ep = config.distributed.ep
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    validate_expert_parallel_config(config, world_size)
    if ep == 1:
        return None
    device = next(model.parameters()).device
    mesh = build_expert_parallel_mesh(ep, device.type)
    ep_rank = dist.get_rank() % ep
    state = ExpertParallel(ep, ep_rank, world_size, mesh)
    ep_group, expert_data_group = state.ep_group, state.expert_data_group
    for module_name, module in model.named_modules():
        if not isinstance(module, MoEFeedForward):
            continue
        shard_experts(module.experts, ep_rank, ep)
        module.dispatcher = ExpertParallelDispatcher(ep_group, ep, module.num_experts)
        prefix = f"{module_name}.experts." if module_name else "experts."
        for name, parameter in module.experts.named_parameters():
            if name in ("in_proj", "out_proj") or module.experts.per_expert_coefficients:
                state.expert_parameter_names.append(prefix + name)
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


# ----------------------------------------------------------------------------------------------- engine


class ExpertParallelDDPEngine(DDPEngine):
    """The `ddp` engine with `distributed.ep` > 1 (`DDPEngine` hands over to this class): experts sharded
    over EP groups (`apply_expert_parallel`), everything else replicated under DDP. Gradient norms count
    each expert once; checkpoints store the experts as DTensor shards, so a run saved with ep=2 resumes
    with ep=1 (or on one process) and vice versa."""

    def __init__(self, config: Config, device: torch.device):
        super().__init__(config, device)
        # Before the model is built: a bad ep fails here, not after minutes of initialisation.
        validate_expert_parallel_config(config, dist.get_world_size() if dist.is_initialized() else 1)

    def setup(self, model: nn.Module, build_optimizer) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self._module = model
        self.expert_parallel = apply_expert_parallel(model, self.config)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # DDP skips the expert shards (listed in model._ddp_params_and_buffers_to_ignore): their hooks
        # reduce them over the expert-data-parallel group instead.
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = build_optimizer(model)

    def clip_grad_norm(self, max_norm: Optional[float]) -> torch.Tensor:
        return self.expert_parallel.clip_grad_norm(self.unwrapped_model(), max_norm)

    def save_checkpoint(self, directory) -> None:
        model_state, optimizer_state = get_state_dict(self.unwrapped_model(), self.optimizer)
        model_state, optimizer_state = self.expert_parallel.to_checkpoint_state(model_state, optimizer_state)
        save_dcp(directory, {"model": model_state, "optimizer": optimizer_state}, distributed=True)

    def load_checkpoint(self, directory, trust_checkpoint: bool = False) -> None:
        model_state, optimizer_state = get_state_dict(self.unwrapped_model(), self.optimizer)
        model_state, optimizer_state = self.expert_parallel.to_checkpoint_state(model_state, optimizer_state)
        state = {"model": model_state, "optimizer": optimizer_state}
        load_dcp(directory, state, distributed=True)
        state = ExpertParallel.from_checkpoint_state(state)
        set_state_dict(
            self.unwrapped_model(), self.optimizer,
            model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        )
