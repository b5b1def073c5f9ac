"""Shared pieces of the multi-process engine tests: the tiny model, a fixed global batch, a minimal training
loop over the `Engine` interface, and an independent single-process reference loop.

The reference loop uses no engine at all (plain model, plain AdamW, the global batch in one piece), so an
engine that scales, averages or shards anything wrongly shows up as a different loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from polycom_lm.config import Config, config_from_dict
from polycom_lm.distributed.engine import Engine
from polycom_lm.models import build_model

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
WORKER = HERE / "engine_worker.py"

GLOBAL_BATCH = 4  # sequences
SEQ_LEN = 16
LEARNING_RATE = 1e-2
MAX_GRAD_NORM = 1.0


def tiny_config(activation: str = "polynorm", qk_norm: bool = False, **distributed) -> Config:
    """4 heads / 2 kv heads, FFN width 64 (gated) or 96 (non-gated): divisible by TP 2."""
    return config_from_dict(
        {
            "model": {
                "vocab_size": 128,
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_hidden_size": 64,
                "activation": activation,
                "activation_impl": "reference",
                "max_seq_len": SEQ_LEN,
                "qk_norm": qk_norm,
            },
            "training": {"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH},
            "distributed": distributed,
        }
    )


def fixed_batch(config: Config, seed: int = 7) -> torch.Tensor:
    """Token ids [GLOBAL_BATCH, SEQ_LEN + 1]: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.model.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)


def build_tiny_model(config: Config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config.model, device="cpu")


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)


class Reference(NamedTuple):
    losses: list[float]
    norms: list[float]  # global gradient norm before clipping, per step


def reference_numbers(config: Config, steps: int) -> Reference:
    """Single-process losses and gradient norms (before clipping) of `steps` steps."""
    losses, norms, _ = _reference(config, steps)
    return Reference(losses, norms)


def assert_matches_reference(measured: dict, expected: Reference, steps: slice, relative: float,
                             norm_relative: Optional[float] = None) -> None:
    """An engine run's losses *and* pre-clip gradient norms equal the single-process ones over `steps`."""
    for kind, actual, wanted, tolerance in (
        ("loss", measured["losses"], expected.losses[steps], relative),
        ("gradient norm", measured["grad_norms"], expected.norms[steps], norm_relative or relative),
    ):
        assert len(actual) == len(wanted), f"{kind}: {len(actual)} steps vs {len(wanted)}"
        for step, (a, e) in enumerate(zip(actual, wanted)):
            assert abs(a - e) <= tolerance * abs(e), f"step {step} {kind}: {a} vs single-process {e} (rel {abs(a - e) / abs(e):.2e})"


def reference_run(config: Config, steps: int) -> tuple[list[float], torch.nn.Module]:
    """(losses, trained model) of `steps` single-process AdamW steps on the whole fixed batch, float32."""
    losses, _, model = _reference(config, steps)
    return losses, model


def _reference(config: Config, steps: int) -> tuple[list[float], list[float], torch.nn.Module]:
    model = build_tiny_model(config)
    optimizer = build_optimizer(model)
    batch = fixed_batch(config)
    losses, norms = [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        optimizer.step()
        losses.append(loss.item())
    return losses, norms, model


def consolidate_and_compare(step_dir: Path, tmp_path: Path, activation: str, steps: int = 2) -> tuple[Path, Path]:
    """Run `polycom-lm checkpoint consolidate` on `step_dir` (as step `steps` of a run in tmp_path/run) and
    check that the file loads strictly into the plain model and equals the single-process model after
    `steps` steps. Returns (run folder, consolidated file)."""
    from safetensors.torch import load_file

    from polycom_lm.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{steps}").symlink_to(step_dir)
    out = tmp_path / "model.safetensors"
    assert main(["checkpoint", "consolidate", str(run_dir), "--step", str(steps), "--out", str(out)]) == 0
    config = tiny_config(activation)
    model = build_tiny_model(config, seed=99)
    model.load_state_dict(load_file(str(out)), strict=True)
    _, trained = reference_run(config, steps=steps)
    # Adam turns 1e-7 gradient noise into ~1e-5 weight noise at lr 1e-2; a wrong row layout is off by ~0.1.
    for name, parameter in trained.state_dict().items():
        error = (model.state_dict()[name] - parameter).abs().max().item()
        assert error < 1e-4, f"{name}: max difference {error:.2e} from the single-process model"
    return run_dir, out


def engine_step(engine: Engine, batch: torch.Tensor, micro_batches: int, fused_chunk: int | None = None) -> tuple[float, float]:
    """One optimizer step the way the training loop does it; returns the global mean loss and the global
    gradient norm before clipping (a gradient scaled wrongly, e.g. divided by the accumulation steps once
    too often, barely moves Adam's losses but shows in the norm). `fused_chunk`: the model computes the
    loss itself, that many tokens at a time (`training.cross_entropy=fused`)."""
    rows = batch.shape[0] // engine.dp_world_size
    assert rows % micro_batches == 0 and rows >= micro_batches, "the fixed batch does not split this way"
    local = batch[engine.dp_rank * rows : (engine.dp_rank + 1) * rows]
    target_tokens = batch[:, 1:].numel()
    engine.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for index, micro in enumerate(local.chunk(micro_batches)):
        with engine.micro_batch_context(is_last_micro_batch=index == micro_batches - 1):
            inputs, targets = micro[:, :-1].to(engine.device), micro[:, 1:].to(engine.device)
            if fused_chunk is not None:
                token_losses = engine.model(inputs, targets=targets, loss_chunk_tokens=fused_chunk)
            else:
                logits = engine.model(inputs)
                token_losses = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
            loss = token_losses / target_tokens * engine.dp_world_size
            engine.backward(loss)
        total += token_losses.detach().double().cpu() / target_tokens
    norm = float(engine.clip_grad_norm(MAX_GRAD_NORM))
    engine.optimizer_step()
    return engine.all_reduce_sum(total).item(), norm


def run_worker(nproc: int, scenario: str, output: Path, *extra: str, timeout_s: int = 300, worker: Path = WORKER) -> None:
    """Launch `worker SCENARIO OUTPUT ...` (default `engine_worker.py`) on `nproc` gloo processes with torchrun."""
    environment = dict(os.environ)
    # One thread per rank, whatever the caller's OMP_NUM_THREADS: several ranks with several OpenMP threads
    # each on a small machine spin against each other (4 ranks x 2 threads on 2 cores made the pp 4
    # launch 4x slower).
    environment["OMP_NUM_THREADS"] = "1"
    environment.setdefault("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))
    environment["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), str(HERE), environment.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(worker), scenario, str(output), *extra,
    ]
    completed = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=timeout_s
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"{scenario} on {nproc} ranks failed (exit {completed.returncode}):\n"
            f"{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
        )


def run_single_process_deepspeed(body: str, *arguments: str, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter without a launcher, after building the tiny model on a ZeRO-2
    `deepspeed` engine (`config`, `engine` defined; `sys.argv[1:]` = `arguments`)."""
    script = (
        "import sys, torch\n"
        "from engine_harness import build_optimizer, build_tiny_model, engine_step, fixed_batch, tiny_config\n"
        "from polycom_lm.distributed.parallelize import build_engine, parallelize\n"
        "config = tiny_config(backend='deepspeed', zero_stage=2)\n"
        "engine = build_engine(config, torch.device('cpu'))\n"
        "parallelize(build_tiny_model(config), config, engine, build_optimizer)\n"
    ) + body + "engine.close()\n"
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPOSITORY}{os.pathsep}{HERE}")
    environment.setdefault("TORCH_EXTENSIONS_DIR", str(REPOSITORY / ".cache" / "torch_extensions"))
    return subprocess.run([sys.executable, "-c", script, *arguments], env=environment, capture_output=True,
                          text=True, timeout=timeout_s)


def finish_worker(results: dict, output: Path) -> None:
    """The end of a multi-process worker: rank 0 writes `results` as JSON to `output`, every rank leaves the
    process group, and the process exits without the interpreter's teardown. (With several DeepSpeed
    engines alive, a background C++ thread torn down out of order at exit can abort a rank ("terminate
    called without an active exception") after every result is written; that says nothing about what the
    test measures.)"""
    import json

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        output.write_text(json.dumps(results, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
