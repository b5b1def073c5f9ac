"""Megatron-style tensor parallelism for the dense model, applied from outside through
`torch.distributed.tensor.parallel`.

Per transformer block: attention q/k/v and the FFN in-proj are column-parallel (each TP rank owns a slice
of heads / of the FFN width), attention o_proj and the FFN out-proj are row-parallel (partial sums
all-reduced), so each block costs one all-reduce in forward for attention and one for the FFN. The LM
head is column-parallel over the vocabulary with its logits gathered. Everything else (embeddings,
RMSNorm gains, activation coefficients) is a replicated DTensor that runs its plain forward on the local
tensor.

Three things plain column/row sharding gets wrong, handled here:

1. Gated activations (SwiGLU) take an in-proj output laid out `[gate | up]`. Contiguous column sharding
   would give rank 0 all gates and rank 1 all ups. The in-proj weight is therefore stored sharded in the
   *interleaved* order `[gate_0 | up_0 | gate_1 | up_1 | ...]` (chunk r on TP rank r), so every rank
   holds matching `[gate_r | up_r]` columns; checkpoints convert to and from the canonical `[gate | up]`
   layout (`state_dict.py`), so a run resumes on any TP degree.
2. Activations that normalise over the FFN width (PolyNorm: `normalizes_over_width = True`) see only
   their shard; their `row_sum_reducer` is set to an all-reduce over the TP group and `full_width` to
   the whole width, so the row norms span all of it (the math lives in the activation's autograd
   function).
3. Replicated parameters inside the sharded region (PolyNorm / PolyReLU `weight`, `bias`; the QK-norm
   gain shared by all heads) get only a partial gradient on each TP rank; their local view sums its
   gradient over the TP group in backward.

Sequence parallelism (`distributed.sequence_parallel`): between the sharded regions the residual stream
is split along the sequence ([batch, seq / tp, d_model] per rank) instead of replicated, so embeddings'
output, RMSNorms and residual adds run on 1/tp of the tokens and their activations take 1/tp of the
memory. Attention and FFN inputs are all-gathered along the sequence, and the row-parallel outputs are
reduce-scattered instead of all-reduced (same communication volume). The norms' (and embeddings')
gradients then come from the local tokens only and are summed over the TP group.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)

# Attribute set on a gated in-proj Linear whose weight is stored in the interleaved TP layout; its value is
# the TP degree. `state_dict.py` reads it to convert to and from the canonical `[gate | up]` layout.
INTERLEAVED_TP_ATTRIBUTE = "polycom_interleaved_tp_degree"


# ------------------------------------------------------------------------------- gated in-proj layout


def canonical_to_interleaved(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    """Rows `[gate | up]` ([2w, ...]) → `[gate_0 | up_0 | ... | gate_{tp-1} | up_{tp-1}]` ([2w, ...])."""
    rest = tensor.shape[1:]
    return tensor.reshape(2, tp, -1, *rest).transpose(0, 1).reshape(tensor.shape)


def interleaved_to_canonical(tensor: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of `canonical_to_interleaved`."""
    rest = tensor.shape[1:]
    return tensor.reshape(tp, 2, -1, *rest).transpose(0, 1).reshape(tensor.shape)


class GatedColwiseParallel(ColwiseParallel):
    """Column parallelism for a `[gate | up]` projection: each rank gets `[gate_r | up_r]`."""

    def _partition_linear_fn(self, name, module, device_mesh):
        tp = device_mesh.size()
        for parameter_name, parameter in module.named_parameters():
            interleaved = canonical_to_interleaved(parameter.detach(), tp)
            sharded = distribute_tensor(interleaved, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            module.register_parameter(
                parameter_name, nn.Parameter(sharded, requires_grad=parameter.requires_grad)
            )
        setattr(module, INTERLEAVED_TP_ATTRIBUTE, tp)


# ----------------------------------------------------------------------- replicated parameters, locally


class _SumGradientOverGroup(torch.autograd.Function):
    """Identity in forward; all-reduce (sum) of the gradient over `group` in backward (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        gradient = gradient.contiguous().clone()
        dist.all_reduce(gradient, op=dist.ReduceOp.SUM, group=ctx.group)
        return gradient, None


def _replicate_parameters_with_local_forward(
    module: nn.Module,
    mesh: DeviceMesh,
    sum_gradients: bool,
    converted: Optional[dict[int, nn.Parameter]] = None,
) -> None:
    """Make `module`'s own parameters Replicate DTensors on `mesh` and run its forward on local tensors.

    With `sum_gradients`, each rank's gradient is a partial one (the module sits between a column- and a
    row-parallel layer) and is summed over the TP group in backward. `converted` maps already replicated
    parameters (by id of the original) to their DTensor, so tied weights stay tied.

    The swap to local tensors happens inside the module's (instance) `forward`, so activation
    checkpointing applied afterwards (`parallelize` orders it after tensor parallelism) recomputes through
    it and the recomputation sees local tensors too.
    """
    converted = {} if converted is None else converted
    names = [name for name, parameter in module.named_parameters(recurse=False) if not isinstance(parameter, DTensor)]
    for name in names:
        parameter = module._parameters[name]
        if id(parameter) not in converted:
            replicated = distribute_tensor(parameter.detach(), mesh, [Replicate()])
            converted[id(parameter)] = nn.Parameter(replicated, requires_grad=parameter.requires_grad)
        module.register_parameter(name, converted[id(parameter)])
    if not names and not sum_gradients:
        return
    group = mesh.get_group()
    original_forward = module.forward

    def forward_on_local_parameters(*args, **kwargs):
        saved = {}
        for name, parameter in module._parameters.items():
            # FSDP may have swapped in its own unsharded DTensor here; take whatever is current.
            if isinstance(parameter, DTensor) and parameter.placements == (Replicate(),):
                local = parameter.to_local()
                if sum_gradients and local.requires_grad:
                    local = _SumGradientOverGroup.apply(local, group)
                saved[name] = parameter
                module._parameters[name] = local
        try:
            return original_forward(*args, **kwargs)
        finally:
            module._parameters.update(saved)

    module.forward = forward_on_local_parameters


def _make_row_sum_reducer(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce_row_sums(row_sums: torch.Tensor) -> torch.Tensor:
        """[rows, r] float32 per-shard row sums → the same sums over the whole FFN width (in place)."""
        dist.all_reduce(row_sums, op=dist.ReduceOp.SUM, group=group)
        return row_sums

    return reduce_row_sums


# ------------------------------------------------------------------------------------------ the plan


def check_tensor_parallel_widths(model: nn.Module, tp: int) -> None:
    """Raise ConfigError when `tp` does not divide a width the plan shards (before any work starts)."""
    for index, block in enumerate(model.layers):
        ffn = block.ffn
        width = ffn.out_proj.in_features
        if width % tp:
            raise ConfigError(
                f"distributed.tp={tp} does not divide the FFN width {width} (layer {index}); valid tp "
                f"degrees: {', '.join(str(d) for d in range(1, width + 1) if width % d == 0 and d <= 64)}"
            )


def _keep_local_sequence_chunk(tp: int, tp_rank: int):
    """Forward hook: [batch, seq, d] → this rank's [batch, seq / tp, d] (gradient zero elsewhere)."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if output.shape[1] % tp:
            raise ValueError(
                f"sequence parallelism over {tp} ranks needs a sequence length divisible by {tp}, got {output.shape[1]}"
            )
        return output.chunk(tp, dim=1)[tp_rank]

    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Apply the Megatron-style plan to a built dense model in place (parameters become DTensors on
    `tp_mesh`). The model must be materialised (not on the meta device); rank 0 of the TP group is the
    source of the parameter values."""
    tp = tp_mesh.size()
    check_tensor_parallel_widths(model, tp)
    # A pipeline stage may lack the embedding or the head (None).
    tied = model.output is not None and model.tok_embeddings is not None and model.output.weight is model.tok_embeddings.weight
    if sequence_parallel and tied:
        raise ConfigError("distributed.sequence_parallel does not support model.tie_embeddings; untie or disable it")
    # With sequence parallelism the residual stream is Shard(1) between the sharded regions.
    residual = Shard(1) if sequence_parallel else Replicate()
    for block in model.layers:
        ffn = block.ffn
        activation = ffn.activation
        gated = bool(getattr(activation, "gated", False))
        plan = {
            "attention.q_proj": ColwiseParallel(),
            "attention.k_proj": ColwiseParallel(),
            "attention.v_proj": ColwiseParallel(),
            "attention.o_proj": RowwiseParallel(output_layouts=residual),
            "ffn.in_proj": GatedColwiseParallel() if gated else ColwiseParallel(),
            "ffn.out_proj": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            # One all-gather along the sequence feeds q, k and v (and in_proj); Attention reads the
            # sequence length from its input, so it must see the whole sequence.
            plan["attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None),
                use_local_output=True,
            )
            plan["ffn"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
        parallelize_module(block, tp_mesh, plan)
        for name in ("q_norm", "k_norm"):
            # One gain shared by all heads; each rank holds only its own heads' contribution.
            if hasattr(block.attention, name):
                _replicate_parameters_with_local_forward(getattr(block.attention, name), tp_mesh, sum_gradients=True)
        if sequence_parallel:
            for norm in (block.attention_norm, block.ffn_norm):
                _replicate_parameters_with_local_forward(norm, tp_mesh, sum_gradients=True)
        if getattr(activation, "normalizes_over_width", False):
            if gated:
                raise ConfigError(
                    f"activation {type(activation).__name__} is gated and normalises over the width; "
                    "tensor parallelism supports one or the other"
                )
            activation.row_sum_reducer = _make_row_sum_reducer(tp_mesh.get_group())
            activation.full_width = ffn.out_proj.in_features
        _replicate_parameters_with_local_forward(activation, tp_mesh, sum_gradients=True)
        for submodule in activation.modules():
            if submodule is not activation and any(True for _ in submodule.parameters(recurse=False)):
                raise ConfigError(
                    f"activation {type(activation).__name__} has parameters in a submodule; the tensor "
                    "parallel plan only knows how to replicate an activation's own coefficients"
                )
    if not tied and model.output is not None:
        parallelize_module(
            model, tp_mesh,
            {"output": ColwiseParallel(input_layouts=residual, output_layouts=Replicate(), use_local_output=True)},
        )
    if sequence_parallel:
        tp_rank = tp_mesh.get_local_rank()
        model.tok_embeddings.register_forward_hook(_keep_local_sequence_chunk(tp, tp_rank))
        _replicate_parameters_with_local_forward(model.tok_embeddings, tp_mesh, sum_gradients=True)
        _replicate_parameters_with_local_forward(model.norm, tp_mesh, sum_gradients=True)
    # Everything not yet sharded (embeddings, norms, QK-norm gains, a tied head) is replicated and computed
    # identically on every TP rank from replicated inputs, so its gradient is already complete.
    converted: dict[int, nn.Parameter] = {}
    for submodule in model.modules():
        if any(not isinstance(p, DTensor) for p in submodule.parameters(recurse=False)):
            _replicate_parameters_with_local_forward(submodule, tp_mesh, sum_gradients=False, converted=converted)
    logger.info(
        "tensor parallel over %d ranks applied to %d blocks (sequence parallel: %s)", tp, len(model.layers), sequence_parallel
    )
    return model


def interleaved_parameter_degrees(model: nn.Module) -> dict[str, int]:
    """FQN of each parameter stored in the interleaved gated layout → its TP degree."""
    degrees: dict[str, int] = {}
    for module_name, module in model.named_modules():
        tp: Optional[int] = getattr(module, INTERLEAVED_TP_ATTRIBUTE, None)
        if tp:
            for parameter_name, _ in module.named_parameters(recurse=False):
                degrees[f"{module_name}.{parameter_name}" if module_name else parameter_name] = tp
    return degrees
