"""Turn one checkpoint step of any engine into a single model state dict (plain, unsharded tensors).

- `ddp` / `fsdp` / tensor parallel: DCP folders (`.metadata` + `*.distcp`). DCP stores global tensors in
  the canonical layout (gated in-proj as `[gate | up]`, see `distributed/state_dict.py`), so only the `model.*`
  entries are read, without a process group, whatever world size or TP degree wrote them.
- `deepspeed`: `<step>/deepspeed/` in DeepSpeed's format; its fp32 master weights are gathered from the
  ZeRO partitions with DeepSpeed's own `zero_to_fp32` reader, whose `torch.load` calls are restricted to
  tensors and DeepSpeed's own classes (`safe_load.deepspeed_loading`) unless `trust_checkpoint`.

The result loads into `build_model(config.model)` with `load_state_dict` (strict).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from polycom_lm.errors import CheckpointError

logger = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"
MODEL_PREFIX = "model."


def checkpoint_format(step_directory: Path) -> str:
    """'dcp' or 'deepspeed'; CheckpointError if the folder is neither."""
    if (step_directory / ".metadata").is_file():
        return "dcp"
    if (step_directory / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    if not step_directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {step_directory}")
    raise CheckpointError(
        f"{step_directory}: neither a DCP checkpoint (.metadata) nor a DeepSpeed one ({DEEPSPEED_TAG}/)"
    )


def consolidated_model_state(step_directory: Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Parameter name → full CPU tensor, read from the checkpoint at `step_directory`. Nothing but tensors
    and known checkpoint classes is unpickled, unless `trust_checkpoint` (DeepSpeed files only)."""
    step_directory = Path(step_directory)
    if checkpoint_format(step_directory) == "dcp":
        return _read_dcp_model(step_directory)
    return _read_deepspeed_model(step_directory, trust_checkpoint)


def _read_dcp_model(step_directory: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from polycom_lm.checkpoint.dcp import load_dcp, read_dcp_metadata

    metadata = read_dcp_metadata(step_directory)
    model: dict[str, torch.Tensor] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata):
            model[key[len(MODEL_PREFIX):]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not model:
        raise CheckpointError(f"{step_directory}: the DCP checkpoint holds no 'model.*' tensors")
    load_dcp(step_directory, {"model": model}, distributed=False)
    return model


def _read_deepspeed_model(step_directory: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from polycom_lm.checkpoint.safe_load import deepspeed_loading

    try:
        with deepspeed_loading(step_directory, trust=trust_checkpoint):
            state = get_fp32_state_dict_from_zero_checkpoint(str(step_directory), tag=DEEPSPEED_TAG)
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{step_directory}: cannot consolidate the DeepSpeed checkpoint ({type(error).__name__}: {error})"
        ) from None
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `state` as one safetensors file, atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors sharing storage (a tied LM head): store each name as its own copy.
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone().contiguous() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    logger.info("wrote %d tensors to %s", len(tensors), path)
