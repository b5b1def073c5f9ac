"""Worker of test_expert_parallel.py: one rank of an expert-parallel run on gloo.

Usage: python expert_parallel_worker.py OUTPUT_DIR EP SINGLE_PROCESS_CHECKPOINT (with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT).
Runs the cases of `expert_parallel_cases()` and saves each rank's results to OUTPUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

STEPS = 3
MAX_GRAD_NORM = 0.5


def expert_parallel_cases() -> list[dict]:
    return [
        {"activation": "polynorm", "per_expert_coefficients": False},
        {"activation": "polyrelu", "per_expert_coefficients": True},
        {"activation": "swiglu", "per_expert_coefficients": False},
    ]


def case_config(case: dict, ep: int):
    from polycom_lm.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "family": "moe", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "qk_norm": True,
                "qk_norm_scope": "full", "activation": case["activation"], "activation_impl": "reference",
                "max_seq_len": 16,
                "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_size": 16,
                        "per_expert_coefficients": case["per_expert_coefficients"]},
            },
            "distributed": {"ep": ep},
        }
    )


def build(config):
    from polycom_lm.models import build_model

    torch.manual_seed(0)
    model = build_model(config.model, device="cpu")
    with torch.no_grad():  # a sharper router than the init's, so the routing is uneven across ranks
        for layer in model.layers:
            layer.ffn.router.weight.mul_(20.0)
    return model


def batch(rank_count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 64, (2 * rank_count, 13), generator=generator)


def step_loss(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return logits, loss + sum(model.last_aux_losses.values())


def main() -> None:
    """Each case through the real `ddp` engine (which hands over to the expert-parallel one), as the
    training loop drives it; the per-expert case also saves a checkpoint."""
    from polycom_lm.distributed.parallelize import build_engine, parallelize

    output_dir, ep, single_process_checkpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    results = []
    for case in expert_parallel_cases():
        config = case_config(case, ep=ep)
        engine = build_engine(config, torch.device("cpu"))
        rank, world_size = dist.get_rank(), dist.get_world_size()
        model = build(config)
        state = parallelize(model, config, engine, lambda module: torch.optim.AdamW(module.parameters(), lr=1e-2)).expert_parallel
        tokens = batch(world_size)[2 * rank : 2 * rank + 2]
        record = {"losses": [], "norms": [], "expert_names": state.expert_parameter_names,
                  "engine": type(engine).__name__}
        for step in range(STEPS):
            engine.zero_grad()
            with engine.micro_batch_context(is_last_micro_batch=True):
                logits = engine.model(tokens[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
                loss = loss + sum(model.last_aux_losses.values())
                engine.backward(loss)  # the local mean loss is the contract's scaled loss (equal batches)
            record["norms"].append(engine.clip_grad_norm(MAX_GRAD_NORM).item())
            if step == 0:
                record["logits"] = logits.detach()
                record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            record["losses"].append(loss.item())
            engine.optimizer_step()
        if case["per_expert_coefficients"]:
            record["checkpoint"] = os.path.join(output_dir, "checkpoint")
            engine.save_checkpoint(record["checkpoint"])
            record["parameters"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            record["exp_avg"] = {n: engine.optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
        results.append(record)
    results.append(resume_single_process_checkpoint(ep, single_process_checkpoint))
    torch.save(results, os.path.join(output_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def resume_single_process_checkpoint(ep: int, directory: str) -> dict:
    """Load a checkpoint written by one process (ep=1) into an expert-parallel engine whose model starts
    from other weights; return this rank's parameters and Adam moments after the load."""
    from polycom_lm.distributed.parallelize import build_engine, parallelize

    case = next(case for case in expert_parallel_cases() if case["per_expert_coefficients"])
    config = case_config(case, ep=ep)
    engine = build_engine(config, torch.device("cpu"))
    torch.manual_seed(5)
    model = build(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # nothing of the original weights survives unless the load restores it
    applied = parallelize(model, config, engine, lambda module: torch.optim.AdamW(module.parameters(), lr=1e-2))
    engine.load_checkpoint(directory)
    return {
        "resumed_parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "resumed_exp_avg": {n: engine.optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()},
        "expert_names": applied.expert_parallel.expert_parameter_names,
    }


if __name__ == "__main__":
    main()
