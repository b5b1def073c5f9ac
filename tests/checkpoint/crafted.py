"""Hostile checkpoints for the safe-loading tests: each one, if unpickled, creates a marker file."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant_in_dcp_byte_item(step_directory: Path, marker: Path, key: str = "optimizer.param_groups.0.lr") -> None:
    """Point the storage entry of DCP byte item `key` at an appended `torch.save`d payload, leaving the
    metadata a genuine `Metadata` object (so the restricted metadata unpickler accepts it)."""
    from polycom_lm.checkpoint.safe_load import load_dcp_metadata

    metadata = load_dcp_metadata(step_directory / ".metadata")
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    blob = io.BytesIO()
    torch.save(Payload(marker), blob)
    data_file = step_directory / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(blob.getvalue())
    metadata.storage_data[index] = type(info)(
        info.relative_path, offset, len(blob.getvalue()), getattr(info, "transform_descriptors", None)
    )
    with open(step_directory / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)


def point_storage_outside(step_directory: Path, relative_path: str) -> None:
    """Make every storage entry of the metadata name `relative_path` (e.g. '../../elsewhere')."""
    from polycom_lm.checkpoint.safe_load import load_dcp_metadata

    metadata = load_dcp_metadata(step_directory / ".metadata")
    for index, info in list(metadata.storage_data.items()):
        metadata.storage_data[index] = type(info)(
            relative_path, info.offset, info.length, getattr(info, "transform_descriptors", None)
        )
    with open(step_directory / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
