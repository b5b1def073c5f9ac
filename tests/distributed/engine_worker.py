"""Multi-process side of the engine tests, run under torchrun by `engine_harness.run_worker`.

`engine_worker.py SCENARIO OUTPUT_JSON [ARGS]`: runs every case of a scenario in one launch (process start
is the expensive part on a busy CPU) and rank 0 writes the measured numbers to OUTPUT_JSON; the pytest
side compares them with single-process references.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from engine_harness import build_optimizer, build_tiny_model, engine_step, finish_worker, fixed_batch, tiny_config
from polycom_lm.distributed.parallelize import build_engine, parallelize
from polycom_lm.distributed.tensor_parallel import interleaved_parameter_degrees, interleaved_to_canonical

DEVICE = torch.device("cpu")


def run_losses(config, steps: int, micro_batches: int = 1, checkpoint_in=None, checkpoint_out=None,
               save_after_step=None, fused_chunk=None) -> dict:
    """Losses of `steps` engine steps; optionally load a checkpoint first and save one after step
    `save_after_step` (default: the last), training on after it."""
    engine = build_engine(config, DEVICE)
    model = build_tiny_model(config)
    parallelize(model, config, engine, build_optimizer)  # as the trainer does
    if checkpoint_in is not None:
        engine.load_checkpoint(Path(checkpoint_in))
    batch = fixed_batch(config)
    losses, norms, times = [], [], []
    save_after_step = steps if save_after_step is None else save_after_step
    for step in range(1, steps + 1):
        started = time.perf_counter()
        loss, norm = engine_step(engine, batch, micro_batches, fused_chunk)
        losses.append(loss)
        norms.append(norm)
        times.append(time.perf_counter() - started)
        if checkpoint_out is not None and step == save_after_step:
            engine.save_checkpoint(Path(checkpoint_out))
    return {"losses": losses, "grad_norms": norms, "step_time_s": sorted(times)[len(times) // 2]}


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name → gradient as the unsharded, canonical-layout tensor."""
    degrees = interleaved_parameter_degrees(model)
    gradients = {}
    for name, parameter in model.named_parameters():
        gradient = parameter.grad
        if isinstance(gradient, DTensor):
            gradient = gradient.full_tensor()
        if name in degrees:
            gradient = interleaved_to_canonical(gradient, degrees[name])
        gradients[name] = gradient
    return gradients


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def tensor_parallel_case(activation: str, qk_norm: bool = False, **distributed) -> dict:
    """Forward output and gradients of one step against the plain model, then a few steps of losses."""
    config = tiny_config(activation, qk_norm, **{"backend": "fsdp", **distributed})
    reference = build_tiny_model(config)
    model = copy.deepcopy(reference)
    engine = build_engine(config, DEVICE)
    parallelize(model, config, engine, build_optimizer)
    batch = fixed_batch(config)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    expected_logits = reference(inputs)
    F.cross_entropy(expected_logits.reshape(-1, expected_logits.shape[-1]), targets.reshape(-1)).backward()
    rows = batch.shape[0] // engine.dp_world_size
    local_inputs = inputs[engine.dp_rank * rows : (engine.dp_rank + 1) * rows]
    local_targets = targets[engine.dp_rank * rows : (engine.dp_rank + 1) * rows]
    logits = engine.model(local_inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), local_targets.reshape(-1), reduction="sum")
    engine.backward(loss / targets.numel() * engine.dp_world_size)
    expected_local = expected_logits[engine.dp_rank * rows : (engine.dp_rank + 1) * rows]
    gradients = full_gradients(engine.unwrapped_model())
    result = {
        "forward_relative_error": relative_error(logits, expected_local),
        "gradient_relative_error": {
            name: relative_error(gradients[name], parameter.grad) for name, parameter in reference.named_parameters()
        },
    }
    activations = [block.ffn.activation for block in engine.unwrapped_model().layers]
    if getattr(activations[0], "normalizes_over_width", False):
        # The silent bug the reducer prevents: norms over the local shard only.
        saved = [(a.row_sum_reducer, a.full_width) for a in activations]
        for module in activations:
            module.row_sum_reducer, module.full_width = None, None
        with torch.no_grad():
            result["naive_shard_norm_relative_error"] = relative_error(engine.model(local_inputs), expected_local)
        for module, (reducer, width) in zip(activations, saved):
            module.row_sum_reducer, module.full_width = reducer, width
    engine.zero_grad()
    return result


def scenario_engines(output: Path, shared: Path) -> dict:
    """2 ranks: data-parallel engines, TP=2 with three activations, and checkpoints across world sizes."""
    results: dict = {}
    results["ddp_fp32_accumulate"] = run_losses(tiny_config(backend="ddp"), steps=3, micro_batches=2)
    results["fsdp_fp32_accumulate"] = run_losses(tiny_config(backend="fsdp"), steps=3, micro_batches=2)
    results["fsdp_cpu_offload"] = run_losses(tiny_config(backend="fsdp", fsdp_cpu_offload=True), steps=3)
    # The fused cross-entropy (head and loss in chunks of 5 tokens) inside the wrapped model.
    results["ddp_fused_cross_entropy"] = run_losses(tiny_config(backend="ddp"), steps=3, micro_batches=2, fused_chunk=5)
    results["fsdp_fused_cross_entropy"] = run_losses(tiny_config(backend="fsdp"), steps=3, micro_batches=2, fused_chunk=5)
    results["fsdp_bf16"] = run_losses(
        config_with(tiny_config(backend="fsdp"), precision="bf16"), steps=3
    )
    for activation in ("polynorm", "polyrelu", "swiglu", "polyprelu", "polyrelunorm"):
        results[f"tp2_{activation}"] = tensor_parallel_case(activation, tp=2)
        results[f"tp2_{activation}"].update(run_losses(tiny_config(activation, backend="fsdp", tp=2), steps=3))
    # Save on 2 ranks (TP 2, interleaved gated layout) after 2 steps; the test resumes on 1.
    # Sequence parallel: norms and embeddings on sequence shards; QK-norm: one gain shared by sharded heads.
    results["tp2_sequence_parallel_polynorm"] = tensor_parallel_case("polynorm", tp=2, sequence_parallel=True)
    results["tp2_sequence_parallel_polynorm"].update(
        run_losses(tiny_config("polynorm", backend="fsdp", tp=2, sequence_parallel=True), steps=3)
    )
    results["tp2_qk_norm_swiglu"] = tensor_parallel_case("swiglu", qk_norm=True, tp=2)
    # Recomputed PolyNorm under TP: the recomputation must see local coefficients and reduce row sums again.
    results["tp2_recomputed_polynorm"] = run_losses(
        config_with(tiny_config("polynorm", backend="fsdp", tp=2), activation_checkpointing="activation"), steps=3
    )
    # Training on after the save shows that saving leaves the live optimizer state alone.
    results["save_tp2_swiglu"] = run_losses(
        tiny_config("swiglu", backend="fsdp", tp=2), steps=4, checkpoint_out=shared / "saved_on_2", save_after_step=2
    )
    # Resume what one process saved after 2 steps, here on 2 data-parallel ranks.
    results["resume_on_2"] = run_losses(
        tiny_config("swiglu", backend="fsdp"), steps=2, checkpoint_in=shared / "saved_on_1"
    )
    results["truncated_shard_load_errors"] = truncated_shard_load_errors(shared / "saved_on_2", shared / "truncated")
    return results


def truncated_shard_load_errors(source: Path, target: Path) -> list[str]:
    """Every rank's error when loading a copy of `source` whose first shard file is cut to 100 bytes (the
    rank that reads it fails; DCP raises its `CheckpointException`, a BaseException, on all ranks)."""
    import shutil

    from polycom_lm.errors import CheckpointError

    if dist.get_rank() == 0:
        shutil.copytree(source, target)
        shard = sorted(target.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    dist.barrier()
    config = tiny_config("swiglu", backend="fsdp", tp=2)
    engine = build_engine(config, DEVICE)
    parallelize(build_tiny_model(config), config, engine, build_optimizer)
    try:
        engine.load_checkpoint(target)
        message = "loaded without an error"
    except CheckpointError as error:
        message = str(error)
    except BaseException as error:  # noqa: BLE001  what a raw failure would look like to the user
        message = f"raw {type(error).__name__}: {error}"
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return messages


def scenario_fsdp_tp(output: Path, shared: Path) -> dict:
    """4 ranks: FSDP 2 × TP 2."""
    results = {}
    for activation in ("polynorm", "polyrelu", "swiglu"):
        case = tensor_parallel_case(activation, tp=2)
        case.update(run_losses(tiny_config(activation, backend="fsdp", tp=2), steps=3, micro_batches=1))
        results[f"fsdp2_tp2_{activation}"] = case
    case = tensor_parallel_case("polynorm", tp=2, backend="ddp")
    case.update(run_losses(tiny_config("polynorm", backend="ddp", tp=2), steps=3, micro_batches=2))
    results["ddp2_tp2_polynorm"] = case
    results["hsdp_replicate2_shard2"] = run_losses(tiny_config(backend="fsdp", fsdp_replicate=2), steps=3)
    return results


def config_with(config, **training):
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def scenario_deepspeed(output: Path, shared: Path) -> dict:
    """2 ranks: ZeRO 1/2/3 in fp32 with gradient accumulation, ZeRO 2 in bf16, and a stage-3 checkpoint."""
    results = {}
    for stage in (1, 2, 3):
        # micro_batch_size 1: DeepSpeed's own config says 2 accumulation steps, as the loop runs them.
        results[f"zero{stage}_fp32_accumulate"] = run_losses(
            config_with(tiny_config(backend="deepspeed", zero_stage=stage), micro_batch_size=1), steps=3, micro_batches=2
        )
    results["zero2_bf16"] = run_losses(
        config_with(tiny_config(backend="deepspeed", zero_stage=2), precision="bf16"), steps=3
    )
    # ZeRO-3 gathers the head's weight around the head's forward, which computes the fused loss.
    results["zero3_fused_cross_entropy"] = run_losses(
        tiny_config(backend="deepspeed", zero_stage=3), steps=3, fused_chunk=5
    )
    results["zero3_saved"] = run_losses(
        tiny_config(backend="deepspeed", zero_stage=3), steps=2, checkpoint_out=shared / "zero3_step2"
    )
    results["zero3_resumed"] = run_losses(
        tiny_config(backend="deepspeed", zero_stage=3), steps=2, checkpoint_in=shared / "zero3_step2"
    )
    return results


SCENARIOS = {"engines": scenario_engines, "fsdp_tp": scenario_fsdp_tp, "deepspeed": scenario_deepspeed}


def main() -> None:
    scenario, output = sys.argv[1], Path(sys.argv[2])
    shared = Path(sys.argv[3]) if len(sys.argv) > 3 else output.parent
    finish_worker(SCENARIOS[scenario](output, shared), output)


if __name__ == "__main__":
    main()
