"""Write a transformers folder from a loaded model: `config.json`, safetensors weights (sharded with an
index when larger than `max_shard_bytes`), `generation_config.json`, the tokenizer files, the remote code
of `PolycomForCausalLM` when the architecture needs it, and `polycom_lm.json` (step, tokens and our exact
model config, so that `polycom-lm eval` of the folder reports where it came from).

Everything is written into a temporary folder beside `out` and renamed into place at the end, so a failed
export leaves no half-written folder; an existing non-empty `out` is replaced only with `force`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from polycom_lm.errors import ConfigError
from polycom_lm.pretrained.architectures import REMOTE_CODE_DIR, architecture_for
from polycom_lm.pretrained.loading import EXPORT_METADATA, SAFETENSORS_FILE, SAFETENSORS_INDEX, LoadedModel
from polycom_lm.pretrained.tokenizer_files import write_tokenizer_files

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size


@dataclass
class ExportResult:
    out: Path
    architecture: str
    files: list[str]
    parameters: int
    shards: int


def check_output_folder(out: Path, force: bool) -> None:
    """ConfigError unless `out` is absent, an empty folder, or may be replaced (`force`)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} exists and is not empty; pass --force to replace it")


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_safetensors_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """`model.safetensors`, or numbered shards and `model.safetensors.index.json`; returns the file names."""
    from safetensors.torch import save_file

    groups = _shards(state, max_shard_bytes)
    names = [SAFETENSORS_FILE] if len(groups) == 1 else [
        f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors" for index in range(len(groups))]
    for name, keys in zip(names, groups):
        # Copies: safetensors refuses views sharing storage (Llama's gate / up halves of our in_proj).
        save_file({key: state[key].detach().cpu().contiguous().clone() for key in keys}, str(folder / name),
                  metadata={"format": "pt"})
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, keys in zip(names, groups) for key in keys},
        }
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(SAFETENSORS_INDEX)
    return names


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def export_model(
    loaded: LoadedModel,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Write the transformers folder of `loaded` to `out` (see the module docstring)."""
    from transformers import GenerationConfig

    out = Path(out)
    check_output_folder(out, force)
    model_config = loaded.model_config
    architecture = architecture_for(model_config)
    state = {key: (tensor.to(dtype) if tensor.is_floating_point() else tensor)
             for key, tensor in loaded.model.state_dict().items()}
    hf_state = architecture.to_hf(state, model_config)

    temporary = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        token_ids = write_tokenizer_files(loaded.tokenizer, temporary, model_config.max_seq_len)
        token_fields = {f"{name}_token_id": token_ids[name] for name in ("bos", "eos", "pad")}
        config = {**architecture.config_dict(model_config), **token_fields,
                  "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}
        _write_json(temporary / "config.json", config)
        generation = GenerationConfig(**{key: value for key, value in token_fields.items() if value is not None})
        (temporary / "generation_config.json").write_text(generation.to_json_string(), encoding="utf-8")
        for name in architecture.remote_files:
            shutil.copyfile(REMOTE_CODE_DIR / name, temporary / name)
        weight_files = write_safetensors_weights(hf_state, temporary, max_shard_bytes)
        _write_json(temporary / EXPORT_METADATA, {
            "format_version": 1, "source": str(loaded.source), "step": loaded.step, "tokens": loaded.tokens,
            "architecture": architecture.name, "dtype": DTYPE_NAMES[dtype],
            "model": dataclasses.asdict(model_config),
        })
        _readable_by_all(temporary)
        _replace_folder(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    parameters = sum(tensor.numel() for tensor in hf_state.values())
    shards = sum(name.endswith(".safetensors") for name in weight_files)
    logger.info("exported %s (%s, %d parameters, %d weight file(s)) to %s", loaded.source, architecture.name,
                parameters, shards, out)
    return ExportResult(out, architecture.name, sorted(p.name for p in out.iterdir()), parameters, shards)


def _readable_by_all(folder: Path) -> None:
    """Give the files the permissions of any new file (safetensors writes its own as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _replace_folder(temporary: Path, out: Path) -> None:
    """Rename `temporary` to `out`; a previous `out` (allowed by the caller) is removed only afterwards."""
    previous = None
    if out.exists():
        previous = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, previous)
    os.replace(temporary, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
