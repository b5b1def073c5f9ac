"""Load a trained model for inference from whatever the user points at (`eval`, `export`, `generate`):

- a run folder (`config.yaml` + `checkpoints/`): its latest checkpoint, or `step`;
- a checkpoint folder (`<run>/checkpoints/step_N`, the run's `config.yaml` two levels up);
- an exported folder (`config.json` + safetensors weights + tokenizer, written by `polycom-lm export`, or
  any Llama / OLMoE folder of transformers).

Checkpoints are read with `consolidated_model_state` (never unpickling code), safetensors for exported
weights. The weights must match the config exactly; anything else is one `CheckpointError` line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from polycom_lm.checkpoint.consolidate import consolidated_model_state
from polycom_lm.checkpoint.folders import find_checkpoint
from polycom_lm.config import ModelConfig, config_from_dict, load_config
from polycom_lm.data.prepare import resolve_tokenizer
from polycom_lm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from polycom_lm.errors import CheckpointError, ConfigError, DataError, PolycomError
from polycom_lm.models import build_model
from polycom_lm.pretrained.architectures import architecture_named
from polycom_lm.train.trainer_state import read_trainer_state

logger = logging.getLogger(__name__)

EXPORT_METADATA = "polycom_lm.json"  # step, tokens and our exact model config, beside config.json
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) with the tokenizer it was trained with."""

    model: nn.Module
    model_config: ModelConfig
    tokenizer: Tokenizer
    source: Path
    kind: str  # "run", "checkpoint" or "export"
    step: Optional[int] = None
    tokens: Optional[int] = None


def model_kind(path: Path) -> str:
    """'export', 'checkpoint' or 'run'; CheckpointError for anything else."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        return "export"
    if path.is_dir() and (path / "trainer_state.json").is_file():
        return "checkpoint"
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    raise CheckpointError(
        f"{path} is not a model: expected a run folder (config.yaml and checkpoints/), a checkpoint folder "
        f"(RUN/checkpoints/step_N) or an exported folder (config.json, from `polycom-lm export`)"
    )


def check_state_matches(state: dict[str, torch.Tensor], model: nn.Module, what: str, tied: bool = False) -> None:
    """CheckpointError naming missing, unexpected and misshaped weights unless `state` fits `model` (with
    `tied` embeddings the LM head may be absent)."""
    expected = model.state_dict()
    optional = {"output.weight"} if tied else set()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if tuple(expected[key].shape) != tuple(state[key].shape))
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names
        )
        raise CheckpointError(f"{what} ({details})")


def build_loaded_model(model_config: ModelConfig, state: dict[str, torch.Tensor], what: str,
                       device: Union[str, torch.device], dtype: torch.dtype) -> nn.Module:
    """Our model for `model_config` with exactly the weights `state`, on `device` in `dtype`, eval mode."""
    model = build_model(model_config, device="meta")
    check_state_matches(state, model, what, tied=model_config.tie_embeddings)
    model.to_empty(device="cpu")  # no throw-away init: every weight is overwritten below
    state = {key: tensor.float() for key, tensor in state.items()}
    if model_config.tie_embeddings:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _run_tokenizer(config, run_dir: Path) -> Path:
    if (run_dir / "tokenizer").is_dir():
        return run_dir / "tokenizer"
    try:
        return resolve_tokenizer(config.data)
    except DataError:
        # The run trained its own tokenizer into data.cache_dir, a path relative to where it was started.
        raise DataError(
            f"cannot find the tokenizer of {run_dir}: data.cache_dir {config.data.cache_dir!r} (from the current "
            f"folder) holds none for its data config; run from the folder it was trained in, or pass --tokenizer DIR"
        ) from None


def _load_checkpoint(directory: Path, run_dir: Path, trust_checkpoint: bool):
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.yaml in the run folder {run_dir} (two levels up)")
    config = load_config(config_path)
    trainer_state = read_trainer_state(directory)
    state = consolidated_model_state(directory, trust_checkpoint=trust_checkpoint)
    what = f"checkpoint {directory} does not match the model of {config_path}"
    return config, state, trainer_state.step, trainer_state.tokens, what


def read_export_metadata(path: Path) -> dict:
    metadata_file = path / EXPORT_METADATA
    if not metadata_file.is_file():
        return {}
    try:
        return json.loads(metadata_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{metadata_file}: not valid JSON ({error})") from None


def read_safetensors_folder(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    from safetensors.torch import load_file

    if (path / SAFETENSORS_INDEX).is_file():
        try:
            files = sorted(set(json.loads((path / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(f"{path / SAFETENSORS_INDEX}: not a safetensors index ({error})") from None
    elif (path / SAFETENSORS_FILE).is_file():
        files = [SAFETENSORS_FILE]
    else:
        raise CheckpointError(f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (only safetensors weights are read)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: weight shard {name} is missing")
        try:
            state.update(load_file(str(path / name)))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path / name}: not a readable safetensors file ({error})") from None
    return state


def _load_export(path: Path):
    try:
        config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({error})") from None
    architectures = config_json.get("architectures") or [None]
    architecture = architecture_named(architectures[0], path / "config.json")
    metadata = read_export_metadata(path)
    if "model" in metadata:
        model_config = config_from_dict({"model": metadata["model"]}).model
    else:
        model_config = architecture.model_config(config_json)
    hf_state = read_safetensors_folder(path)
    try:
        state = architecture.from_hf(hf_state, model_config)
    except KeyError as error:
        raise CheckpointError(f"{path}: weight {error.args[0]} is missing for {architecture.name}") from None
    what = f"the weights in {path} do not match its config.json"
    return model_config, state, metadata.get("step"), metadata.get("tokens"), what


def load_model(
    path: Union[str, Path],
    *,
    step: Optional[int] = None,
    tokenizer: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Load the model at `path` (see the module docstring). `step` picks a run's checkpoint; `tokenizer`
    overrides where the tokenizer is read from."""
    path = Path(path)
    kind = model_kind(path)
    if step is not None and kind != "run":
        raise ConfigError(f"--step picks a checkpoint of a run folder; {path} is a {kind} folder, not a run folder")
    if kind == "export":
        model_config, state, step_number, tokens, what = _load_export(path)
        tokenizer_dir = Path(tokenizer) if tokenizer else path
    else:
        directory = find_checkpoint(path, step) if kind == "run" else path
        run_dir = path if kind == "run" else path.parent.parent
        config, state, step_number, tokens, what = _load_checkpoint(directory, run_dir, trust_checkpoint)
        model_config = config.model
        tokenizer_dir = Path(tokenizer) if tokenizer else _run_tokenizer(config, run_dir)
    try:
        loaded_tokenizer = load_tokenizer(tokenizer_dir)
    except PolycomError as error:
        raise DataError(f"tokenizer of {path}: {error}") from None
    check_vocab(loaded_tokenizer.vocab_size, model_config.vocab_size, f"tokenizer {tokenizer_dir}")
    # Inference feeds ever-new shapes (padded batches of varying widths); oneDNN compiles a kernel for
    # each new shape, so its fp32 CPU path loses to ATen's here (`scripts/bench_eval.py`, model.linear_impl).
    model = build_loaded_model(dataclasses.replace(model_config, linear_impl="aten"), state, what, device, dtype)
    logger.info("loaded %s model %s (step %s, %s, %s)", kind, path, step_number, model_config.family,
                model_config.activation)
    return LoadedModel(model, model_config, loaded_tokenizer, path, kind, step_number, tokens)
