"""The paper's two analyses of a trained model.

- Effective rank (Roy & Vetterli, 2007) of a matrix with singular values σ: p_k = σ_k / Σ_j σ_j,
  erank = exp(−Σ_k p_k log p_k); between 1 (rank one) and min(rows, columns) (all σ equal). Computed for
  each layer's FFN in-projection [in_width, d_model] and out-projection [d_model, width], per expert for
  MoE layers (the layer's value is then the mean over experts).
- Layer-wise cosine similarity of hidden states: for each block l = 0..n_layers-1, cos(h_l, h_{l+1}) over
  d_model for every token of a validation batch, averaged over tokens, where h_l is the block's input (h_0
  the embedding output) and h_{l+1} its output: how much each layer turns the representation.

Models are read from a run folder (its latest checkpoint) or a checkpoint folder (`<run>/checkpoints/step_N`),
with the run's `config.yaml`: weights through `consolidated_model_state` (no code runs on load).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from polycom_lm.checkpoint.consolidate import consolidated_model_state
from polycom_lm.checkpoint.folders import find_checkpoint
from polycom_lm.config import Config
from polycom_lm.errors import CheckpointError
from polycom_lm.pretrained.loading import build_loaded_model
from polycom_lm.train.output import CHECKPOINTS_DIR, CONFIG_FILE, read_saved_config
from polycom_lm.train.trainer_state import read_trainer_state


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the L1-normalised singular values of a 2-D `matrix` (computed in float64)."""
    singular_values = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def ffn_matrices(model: nn.Module) -> list[dict[str, list[torch.Tensor]]]:
    """Per layer, {"in_proj": [matrix per expert], "out_proj": [...]} (one matrix each for dense FFNs)."""
    layers = []
    for block in model.layers:
        ffn = block.ffn
        if hasattr(ffn, "experts"):
            experts = ffn.experts
            layers.append({"in_proj": list(experts.in_proj.detach()), "out_proj": list(experts.out_proj.detach())})
        else:
            layers.append({"in_proj": [ffn.in_proj.weight.detach()], "out_proj": [ffn.out_proj.weight.detach()]})
    return layers


def effective_ranks(model: nn.Module) -> dict[str, Any]:
    result: dict[str, Any] = {"in_proj": [], "out_proj": [], "per_expert": {"in_proj": [], "out_proj": []}}
    for layer in ffn_matrices(model):
        for name, matrices in layer.items():
            ranks = [effective_rank(matrix) for matrix in matrices]
            result["per_expert"][name].append(ranks)
            result[name].append(sum(ranks) / len(ranks))
    first = ffn_matrices(model)[0]
    result["max_rank"] = {name: min(matrices[0].shape) for name, matrices in first.items()}
    if all(len(ranks) == 1 for ranks in result["per_expert"]["in_proj"]):
        del result["per_expert"]
    return result


@torch.no_grad()
def hidden_state_cosine_similarity(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Per block l, the mean over tokens of cos(its input h_l, its output h_{l+1}); h_0 is the embedding output."""
    states: list[torch.Tensor] = []
    hooks = [model.tok_embeddings.register_forward_hook(lambda module, inputs, output: states.append(output))]
    hooks += [layer.register_forward_hook(lambda module, inputs, output: states.append(output)) for layer in model.layers]
    sums = torch.zeros(len(model.layers), dtype=torch.float64)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for input_ids in batches:
            states.clear()
            model(input_ids)
            for index in range(len(model.layers)):
                cosine = F.cosine_similarity(states[index].double(), states[index + 1].double(), dim=-1)
                sums[index] += cosine.sum()
            tokens += input_ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {"values": (sums / max(tokens, 1)).tolist(), "tokens": tokens,
            "definition": "per layer l: mean over tokens of cos(h_l, h_l+1), the layer's input and output "
                          "(h_0 = embedding output)"}


def resolve_model_folder(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path, find_checkpoint(path)
    run = path.parent.parent
    if path.parent.name == CHECKPOINTS_DIR and (run / CONFIG_FILE).is_file():
        return run, path
    raise CheckpointError(
        f"{path} is neither a run folder (with {CONFIG_FILE}) nor a checkpoint folder inside one "
        f"(<run>/{CHECKPOINTS_DIR}/step_N)"
    )


def load_trained_model(path: Path, device: str = "cpu") -> tuple[nn.Module, Config, Path, int]:
    """(model in eval mode on `device`, fp32; its config; the checkpoint folder; its step)."""
    run, checkpoint = resolve_model_folder(path)
    config = read_saved_config(run / CONFIG_FILE)
    step = read_trainer_state(checkpoint).step
    # The fused kernels compute the same function without compiling anything for a few forwards.
    model_config = dataclasses.replace(config.model, activation_impl="fused")
    model = build_loaded_model(model_config, consolidated_model_state(checkpoint),
                               f"{checkpoint} does not fit the model of {run / CONFIG_FILE}", device, torch.float32)
    return model, config, checkpoint, step


def validation_batches(config: Config, data: Optional[str], max_tokens: int, batch_size: int) -> tuple[str, list[torch.Tensor]]:
    """(description, input_id batches [b, seq_len]) from `data` (a shard folder or any data source, tokenised
    with the run's tokenizer) or, by default, the run's first validation set."""
    from polycom_lm.config import ValidationSetConfig
    from polycom_lm.data import ValidationDataset, prepare_run_data
    from polycom_lm.errors import DataError

    data_config = config.data
    if data is not None:
        data_config = dataclasses.replace(data_config, validation=[ValidationSetConfig(name="analysis", source=data)])
    prepared = prepare_run_data(data_config, is_main_process=True, barrier=lambda: None)
    if not prepared.validation:
        raise DataError("the run has no validation set; pass --data with a held-out source or shard folder")
    name, shard = ("analysis", prepared.validation["analysis"]) if data is not None else next(iter(prepared.validation.items()))
    dataset = ValidationDataset(shard, config.training.seq_len)
    batches = [batch["input_ids"][:, :-1] for batch in dataset.batches(batch_size, 0, 1, max_tokens)]
    return (data or f"validation set {name!r}"), batches


def analyze_model(path: Path, data: Optional[str] = None, max_tokens: int = 16384, batch_size: int = 8,
                  device: str = "cpu") -> dict[str, Any]:
    """Both analyses of the model at `path`, as a JSON-ready dict."""
    model, config, checkpoint, step = load_trained_model(path, device)
    description, batches = validation_batches(config, data, max_tokens, batch_size)
    batches = [batch.to(device) for batch in batches]
    result = {
        "checkpoint": str(checkpoint),
        "step": step,
        "activation": config.model.activation,
        "family": config.model.family,
        "effective_rank": effective_ranks(model),
        "cosine_similarity": hidden_state_cosine_similarity(model, batches),
        "data": description,
    }
    return result
