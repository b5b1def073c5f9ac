"""The experts of a mixture-of-experts layer: grouped matmuls over token rows sorted by expert.

Every expert is an FFN `out_proj(activation(in_proj(x)))` with its own weights; the weights of all the
experts of a layer are stacked into 3-D parameters so that each projection over all experts is one grouped
matmul (`torch._grouped_mm` where the installed torch has it on the device, else a padded batched matmul).
The activation is any registered one. PolyCom coefficients (PolyNorm / PolyReLU `w`, `b`) are shared by all
the experts of a layer, as in the paper's code, or one set per expert (`per_expert_coefficients`), gathered
per row so that no Python loop over experts is needed. Either way a PolyNorm row norm spans one token's row
of one expert, i.e. that expert's full width.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from polycom_lm.activations.kernels.reference import (
    polynomial_reference,
    polynorm_reference,
    polyrelu_reference,
    polyrelunorm_reference,
)
from polycom_lm.errors import ConfigError
from polycom_lm.models.init import normal_init_

# Activations whose coefficients can be held per expert: name → formula taking (x, weight, bias) where
# weight broadcasts as [r, rows, 1] and bias as [rows, 1]. These are the plain-autograd formulas, which keep
# the powers of x for backward: per-expert coefficients trade the shared path's fused kernel (and its
# memory saving) for one coefficient set per expert.
# PolyPReLU is not among them: its slope would need a per-expert copy too.
PER_EXPERT_FORMULAS = {
    "polynorm": polynorm_reference,
    "polyrelu": polyrelu_reference,
    "poly": polynomial_reference,
    "polyrelunorm": polyrelunorm_reference,
}

EXPERT_MATMULS = ("auto", "grouped_mm", "padded_bmm")


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `torch._grouped_mm` has a kernel for `device` and `dtype` in the installed torch (CPU
    kernels exist from torch 2.9; CUDA needs compute capability 8.0+; no float64 anywhere)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in GROUPED_MM_DTYPES:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
        return version >= (2, 9)
    return False


def _grouped_mm_applicable(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel also needs 16-byte aligned strides (in and out widths multiples of 4 fp32 / 8 bf16)."""
    if not grouped_mm_supported(rows.device, rows.dtype):
        return False
    if torch.compiler.is_compiling() and rows.dtype != torch.bfloat16:
        return False  # torch.compile traces _grouped_mm for bf16 only (its meta function rejects the rest)
    size = rows.element_size()
    return all((width * size) % 16 == 0 for width in (weight.shape[1], weight.shape[2]))


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward rejects
    expanded (stride-0) gradients such as the one of a `.sum()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(
    rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, implementation: str = "auto"
) -> torch.Tensor:
    """Per-expert linear map of rows sorted by expert.

    rows [S, in] (the first counts[0] rows belong to expert 0, the next counts[1] to expert 1, ...),
    weight [E, out, in], counts [E] int64 with sum S → [S, out], row s multiplied by its expert's weight.

    `implementation`: "grouped_mm", "padded_bmm", or "auto"; grouped_mm falls back to padded_bmm where
    the device or dtype has no grouped kernel (e.g. float64), so a config stays valid on every machine.
    """
    if implementation not in EXPERT_MATMULS:
        raise ConfigError(f"unknown expert matmul {implementation!r}; valid: {', '.join(EXPERT_MATMULS)}")
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        # Neither kernel is autocast-aware: run in the autocast dtype, as nn.Linear would.
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
    else:
        rows = rows.to(weight.dtype)
    if implementation != "padded_bmm" and _grouped_mm_applicable(rows, weight):
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        return _ContiguousGradient.apply(torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offsets))
    return _padded_bmm_linear(rows, weight, counts)


def _padded_bmm_linear(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The fallback: scatter rows into a zero-padded [E, max_count, in] batch, one `bmm`, gather back."""
    num_experts = weight.shape[0]
    total = rows.shape[0]
    max_count = int(counts.max()) if total else 0
    expert_of_row = torch.repeat_interleave(
        torch.arange(num_experts, device=rows.device), counts, output_size=total
    )
    starts = torch.cumsum(counts, dim=0) - counts
    position = torch.arange(total, device=rows.device) - starts[expert_of_row]
    padded = rows.new_zeros(num_experts, max_count, rows.shape[1])
    padded = padded.index_put((expert_of_row, position), rows)
    return torch.bmm(padded, weight.transpose(1, 2))[expert_of_row, position]


class PerExpertCoefficients(nn.Module):
    """PolyNorm / PolyReLU with one coefficient set per expert.

    `weight` [E, r] (weight[e, 0] multiplies the highest power), `bias` [E]. Initialised from a shared
    activation module so that the per-expert init equals the shared one (w = 1/r, b = 0).
    """

    gated = False
    has_coefficients = True

    def __init__(self, name: str, template: nn.Module, num_experts: int):
        super().__init__()
        if name not in PER_EXPERT_FORMULAS:
            raise ConfigError(
                f"model.moe.per_expert_coefficients needs a PolyCom activation "
                f"({', '.join(sorted(PER_EXPERT_FORMULAS))}), got model.activation {name!r}"
            )
        self.name = name
        self.formula = PER_EXPERT_FORMULAS[name]
        # The shared module of the same activation defines the init (its reset rule); it is kept in a tuple,
        # outside the module tree, because its parameters are not the model's.
        self._template = (template,)
        self.eps = getattr(template, "eps", None)
        order = template.weight.shape[0]
        self.weight = nn.Parameter(torch.empty(num_experts, order, device=template.weight.device))
        self.bias = nn.Parameter(torch.empty(num_experts, device=template.weight.device))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def reset_parameters(self) -> None:
        template = self.template
        with torch.no_grad():
            template.to_empty(device=self.weight.device)
            template.reset_parameters()
            self.weight.copy_(template.weight.to(self.weight.dtype).expand_as(self.weight))
            self.bias.copy_(template.bias.reshape(()).to(self.bias.dtype).expand_as(self.bias))

    def forward(self, x: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """x [S, width], expert_of_row [S] (local expert index of each row) → [S, width]."""
        weight_rows = self.weight[expert_of_row].transpose(0, 1).unsqueeze(-1)  # [r, S, 1]
        bias_rows = self.bias[expert_of_row].unsqueeze(-1)  # [S, 1]
        if self.eps is not None:
            return self.formula(x, weight_rows, bias_rows, self.eps)
        return self.formula(x, weight_rows, bias_rows)

    def extra_repr(self) -> str:
        return f"{self.name}, experts={self.weight.shape[0]}, order={self.weight.shape[1]}"


class GroupedExperts(nn.Module):
    """E FFN experts as stacked weights.

    `in_proj` [E, in_width, d_model] (in_width = 2·width laid out `[gate | up]` for gated activations,
    else width), `out_proj` [E, d_model, width]. `forward(rows [S, d_model], counts [E]) → [S, d_model]`
    where rows are sorted by expert. Expert parallelism keeps a slice of the experts on each rank (see
    `polycom_lm.distributed.expert_parallel`); `num_experts` is then the local count.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        width: int,
        activation: nn.Module,
        activation_name: str,
        per_expert_coefficients: bool = False,
        matmul: str = "auto",
    ):
        super().__init__()
        if matmul not in EXPERT_MATMULS:
            raise ConfigError(f"model.moe.expert_matmul {matmul!r} is not one of {', '.join(EXPERT_MATMULS)}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.width = width
        self.gated = bool(activation.gated)
        self.matmul = matmul
        self.per_expert_coefficients = per_expert_coefficients
        if per_expert_coefficients:
            self.activation: nn.Module = PerExpertCoefficients(activation_name, activation, num_experts)
        else:
            self.activation = activation
        in_width = activation.in_width(width)
        self.in_proj = nn.Parameter(torch.empty(num_experts, in_width, d_model))
        self.out_proj = nn.Parameter(torch.empty(num_experts, d_model, width))

    def init_weights(
        self, init_std: float, output_std: float, generator: Optional[torch.Generator] = None,
        truncation: Optional[float] = None,
    ) -> None:
        normal_init_(self.in_proj, init_std, truncation, generator)
        normal_init_(self.out_proj, output_std, truncation, generator)
        reset = getattr(self.activation, "reset_parameters", None)
        if callable(reset):
            reset()

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        hidden = grouped_linear(rows, self.in_proj, counts, self.matmul)
        if self.per_expert_coefficients:
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.num_experts, device=rows.device), counts, output_size=rows.shape[0]
            )
            hidden = self.activation(hidden, expert_of_row)
        else:
            # Every activation here is row-wise, so one call over all experts' rows equals one call per
            # expert: a PolyNorm row is one token's full-width row of one expert.
            hidden = self.activation(hidden)
        return grouped_linear(hidden, self.out_proj, counts, self.matmul)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, d_model={self.d_model}, width={self.width}, matmul={self.matmul}"
