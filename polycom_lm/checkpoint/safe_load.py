"""Reading checkpoints without running code from them.

A pickle can call any function while it is loaded, so every byte of a checkpoint that reaches an unpickler
is checked here first. Three readers cover every file a checkpoint holds:

- DCP `.metadata` (`load_dcp_metadata`): an unpickler that accepts only the classes DCP's metadata is made
  of (its own dataclasses, `torch.Size`, dtypes, layouts, paths). Stock DCP uses plain `pickle.load`.
- DCP data files (`SafeFileSystemReader` + `SafeLoadPlanner`): tensors are read with
  `torch.load(weights_only=True)` (as stock DCP does), and so are non-tensor items (optimizer
  `param_groups` values, stored as `BYTE_IO` blobs), which stock DCP loads with `weights_only=False`.
  Storage entries must name a file inside the checkpoint folder. The reader refuses any other planner,
  so a load cannot silently fall back to the unsafe one.
- DeepSpeed's `*.pt` files (`deepspeed_loading`): DeepSpeed (its engine and `zero_to_fp32`) calls
  `torch.load(weights_only=False)`. Inside this context every `torch.load` is `weights_only=True` with the
  three DeepSpeed classes its checkpoints hold allowed (`DEEPSPEED_SAFE_GLOBALS`). A file that needs any
  other class is refused, unless the user passes `--trust-checkpoint` (then DeepSpeed loads as it does).

Every refusal is a one-line `CheckpointError` naming the file and what it tried to load.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from polycom_lm.errors import CheckpointError, first_line

TRUST_FLAG = "--trust-checkpoint"

_METADATA_CLASSES: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_dcp_metadata(path: Path) -> Metadata:
    """Read a DCP `.metadata` file, accepting only DCP's own metadata classes."""
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path}: not a valid checkpoint metadata file ({error})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not a checkpoint metadata file (holds a {type(metadata).__name__})")
    return metadata


def weights_only_load(data: Any, culprit: str, **kwargs: Any) -> Any:
    """`torch.load(data, weights_only=True)`; a refused or corrupt pickle is a one-line CheckpointError."""
    try:
        return torch.load(data, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{culprit}: refusing to unpickle it ({refused_global(error)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"{culprit}: unreadable ({first_line(error)})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor items are unpickled with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = weights_only_load(value, f"checkpoint item {fqn!r}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` with a restricted metadata unpickler, storage entries confined to the checkpoint
    folder, and only `SafeLoadPlanner` accepted (so byte items are never fully unpickled)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_dcp_metadata(path)
        for info in (metadata.storage_data or {}).values():
            relative = PurePosixPath(str(getattr(info, "relative_path", "")))
            if relative.is_absolute() or len(relative.parts) != 1 or relative.name in ("", ".", ".."):
                raise CheckpointError(
                    f"{path}: a storage entry names {str(relative)!r}, outside the checkpoint folder"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: LoadPlanner) -> Any:
        if not isinstance(planner, SafeLoadPlanner):
            raise CheckpointError(
                f"{self.path}: refusing to read with {type(planner).__name__}; use SafeLoadPlanner"
            )
        return super().read_data(plan, planner)


# --------------------------------------------------------------------------------------------- DeepSpeed


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 puts into its ZeRO 1/2/3 checkpoints (fp32 and bf16) besides tensors and
    builtins. Each is rebuilt from plain data without running its constructor, so allowing them runs no
    code: an IntEnum looked up by value, and two plain records."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_loading(directory: Path, trust: bool = False) -> Iterator[None]:
    """Run DeepSpeed's checkpoint readers (engine load, `zero_to_fp32`) with every `torch.load` restricted to
    tensors, builtins and `DEEPSPEED_SAFE_GLOBALS`. With `trust` (the user's `--trust-checkpoint`), loading is
    left as DeepSpeed does it."""
    if trust:
        yield
        return
    original = torch.load
    safe_globals = _deepspeed_safe_globals()

    def restricted_load(source: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(safe_globals):
                return original(source, *args, **kwargs)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{source}: refusing to unpickle it ({refused_global(error)}); DeepSpeed files are loaded "
                f"with tensors and DeepSpeed's own classes only. Pass {TRUST_FLAG} only if you made this "
                f"checkpoint yourself"
            ) from None

    torch.load = restricted_load
    try:
        yield
    finally:
        torch.load = original


def refused_global(error: BaseException) -> str:
    """'it would load posix.system' from torch's weights_only message, else its most specific line."""
    text = str(error)
    match = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text)
    if match:
        return f"it would load {match.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (detail or lines or [type(error).__name__])[0]
