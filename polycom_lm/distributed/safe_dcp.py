"""Loading DCP checkpoints without unpickling arbitrary objects.

`torch.distributed.checkpoint`'s `FileSystemReader` reads tensor files with `torch.load(weights_only=True)`
but the `.metadata` file with plain `pickle.load`, so a crafted checkpoint could run code on load.
`SafeFileSystemReader` reads `.metadata` with an unpickler that only accepts the classes DCP metadata is
made of (DCP's own metadata dataclasses, `torch.Size`, dtypes, layouts, paths); anything else is a
`CheckpointError`. Pass it as `dcp.load(state, storage_reader=SafeFileSystemReader(directory))`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from polycom_lm.errors import CheckpointError

_ALLOWED: dict[str, set[str]] = {
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
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_metadata(path: Path) -> Metadata:
    """Read a DCP `.metadata` file, accepting only DCP's own metadata classes."""
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: not a valid checkpoint metadata file ({error})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: not a checkpoint metadata file (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata load is restricted (tensor files are already weights_only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
