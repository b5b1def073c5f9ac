"""Choosing how PolyCom runs: the one place that names the choices.

`IMPLS`, the implementation (`model.activation_impl`):
- `reference`: plain autograd of the formula (obviously correct; keeps every intermediate).
- `fused`: the memory-efficient autograd Function; Triton kernels on CUDA, eager PyTorch ops elsewhere.
- `compiled`: the closed-form bodies under `torch.compile`, as custom ops.
- `auto`: the fastest correct one for the device: `fused` (Triton) on CUDA; on CPU `compiled` for
  tensors of at least `COMPILED_MIN_ELEMENTS` elements when `torch.compile` works there, else `fused`
  (for small tensors the one-off compilation, tens of seconds, costs more than it saves). Inside a
  model that is itself being compiled, `fused` (its closed form is traced and fused by Inductor).

`FUSED_BACKENDS`, where the `fused` Function's per-row work runs (`fused_backend` picks one):
- `eager`: the closed-form PyTorch ops (any device);
- `inductor`: the same ops compiled by `torch.compile` (used by `compiled` under tensor parallelism);
- `triton`: hand-written Triton kernels (CUDA; on CPU only under `TRITON_INTERPRET=1`, for tests).
"""

from __future__ import annotations

import functools
import logging

import torch

IMPLS = ("auto", "reference", "fused", "compiled")
FUSED_BACKENDS = ("eager", "inductor", "triton")
COMPILED_MIN_ELEMENTS = 1 << 16

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True if Triton imports (its kernels still need a CUDA tensor, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@functools.lru_cache(maxsize=None)
def compile_available(device_type: str) -> bool:
    """True if `torch.compile` can build a kernel for `device_type` here (e.g. a C compiler for CPU)."""
    if not hasattr(torch, "compile"):
        return False
    try:
        probe = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        probe(torch.ones(4, device=device_type))
    except Exception as error:  # any backend failure means: not usable here
        logger.warning("torch.compile is not usable on %s (%s); PolyCom falls back to 'fused'", device_type, error)
        return False
    return True


def fused_backend(device: torch.device) -> str:
    """The backend of the `fused` implementation on `device`.

    While `torch.compile` traces a model the closed-form PyTorch ops are used even on CUDA: Inductor
    fuses them into its own Triton kernels together with the neighbouring ops, and the trace stays free of
    hand-written kernel launches."""
    if device.type == "cuda" and triton_available() and not torch.compiler.is_compiling():
        return "triton"
    return "eager"


def resolve_impl(impl: str, device: torch.device, numel: int = COMPILED_MIN_ELEMENTS) -> str:
    """Map `impl` (one of IMPLS) to the concrete implementation used for a `numel`-element input on
    `device`."""
    if impl not in IMPLS:
        raise ValueError(f"unknown activation impl {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if torch.compiler.is_compiling():
        # Inside a model being compiled: trace the closed form so Inductor fuses it with its neighbours
        # (and no compilation is started from inside the trace).
        return "fused"
    if device.type == "cuda":
        return "fused"
    if device.type == "cpu" and numel >= COMPILED_MIN_ELEMENTS and compile_available("cpu"):
        return "compiled"
    return "fused"
