"""Pipeline-parallel runs of the trainer's real step (`Trainer.train_step`: loss normalisation, schedule,
cross-stage clipping, auxiliary losses, metrics) on fixed batches, and the single-process reference.

`pipeline_worker.py SCENARIO OUTPUT_JSON SHARED_DIR` runs every case of a scenario in one torchrun launch;
rank 0 writes {case: {"losses", "grad_norms", ...}}. `trainer_numbers(config, steps)` is the same loop on
one process (no pipeline), which the tests compare against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from engine_harness import finish_worker
from polycom_lm.config import Config, config_from_dict
from polycom_lm.distributed.gradients import clip_gradients_, global_gradient_norm
from polycom_lm.distributed.parallelize import build_engine, check_parallel_config
from polycom_lm.train.loop import Trainer, token_loss_sum
from polycom_lm.train.optim import build_schedule
from polycom_lm.train.run import setup_model
from polycom_lm.train.trainer_state import TrainerState
from polycom_lm.train.validation import batch_layout

SEQ_LEN = 16
GLOBAL_BATCH = 8
VOCAB = 128
DEVICE = torch.device("cpu")


def pipeline_config(activation: str = "polynorm", family: str = "dense", **distributed) -> Config:
    """4 blocks (pp 4 gets one each), 4 heads / 2 kv heads (TP 2), a 4-expert top-2 MoE for `moe`."""
    model = {
        "family": family, "vocab_size": VOCAB, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
        "ffn_hidden_size": 64, "activation": activation, "activation_impl": "reference", "max_seq_len": SEQ_LEN,
    }
    if family == "moe":
        model["moe"] = {"num_experts": 4, "top_k": 2, "expert_hidden_size": 16, "z_loss_weight": 0.001}
    return config_from_dict({
        "model": model,
        "training": {"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": 2,
                     "log_every_steps": 1},
        "optimizer": {"lr": 1e-2, "grad_clip_norm": 1.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "distributed": distributed,
    })


class FixedBatches:
    """`global_batch` of a packed dataset: step k's global batch is fixed random tokens (seeded by the
    samples consumed), so every layout reads the same global batches. `document_ids`: two packed documents
    per sequence (a boundary after token 7), for `data.document_masks`."""

    def __init__(self, document_ids: bool = False):
        self.document_ids = document_ids

    def global_batch(self, consumed_samples: int, global_batch_size: int, dp_rank: int, dp_world_size: int) -> dict:
        generator = torch.Generator().manual_seed(1000 + consumed_samples)
        tokens = torch.randint(0, VOCAB, (global_batch_size, SEQ_LEN + 1), generator=generator)
        rows = global_batch_size // dp_world_size
        batch = {"input_ids": tokens[dp_rank * rows:(dp_rank + 1) * rows]}
        if self.document_ids:
            batch["document_ids"] = (torch.arange(SEQ_LEN + 1) >= 7).long().expand(rows, -1).clone()
        return batch


def make_trainer(config: Config, world_size: int, trainer_class=Trainer, document_ids: bool = False) -> Trainer:
    check_parallel_config(config, world_size)
    layout = batch_layout(config, world_size)
    engine = build_engine(config, DEVICE)
    setup_model(config, engine)
    return trainer_class(
        config, engine, layout, FixedBatches(document_ids), TrainerState(world_size=world_size),
        build_schedule(config.schedule, config.training.max_steps, layout.tokens_per_step), [],
        flops_per_token=1.0, peak_flops_per_device=1.0, world_size=world_size,
        barrier=lambda: None, save_checkpoint=lambda trainer: None,
    )


def eval_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (4, SEQ_LEN + 1), generator=generator)


def run(trainer: Trainer, steps: int, save_after: Optional[int] = None, save_to: Optional[Path] = None,
        load_from: Optional[Path] = None) -> dict:
    """Losses, pre-clip gradient norms and auxiliary losses of `steps` steps; optionally resume first (the
    step counter and samples consumed of a checkpoint after `load_from_step` steps) and save after a step."""
    if load_from is not None:
        trainer.engine.load_checkpoint(load_from)
        state = json.loads((load_from / "state.json").read_text())
        trainer.state.step, trainer.state.consumed_samples = state["step"], state["consumed_samples"]
    result: dict = {"losses": [], "grad_norms": [], "aux": [], "coefficients": {}}
    for step in range(steps):
        outcome = trainer.train_step()
        result["losses"].append(outcome.loss)
        result["grad_norms"].append(outcome.grad_norm)
        result["aux"].append(outcome.aux_losses)
        if save_to is not None and trainer.state.step == save_after:
            trainer.engine.save_checkpoint(save_to)
            if not dist.is_initialized() or dist.get_rank() == 0:
                (save_to / "state.json").write_text(json.dumps(
                    {"step": trainer.state.step, "consumed_samples": trainer.state.consumed_samples}))
    row = trainer.training_row([outcome], 1.0)
    result["coefficients"] = {k: v for k, v in row.items() if k.startswith("coefficients/")}
    result["moe_metrics"] = sorted(k for k in row if k.startswith("moe/"))
    engine = trainer.engine
    tokens = eval_batch()
    if engine.pipeline is not None:
        loss = engine.pipeline.forward_loss_sum(tokens[:, :-1], tokens[:, 1:], None, _summed_loss)
    else:
        with torch.no_grad():
            loss = _summed_loss(engine.model(tokens[:, :-1]), tokens[:, 1:])
    result["eval_loss_sum"] = float(loss)
    return result


def _summed_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def trainer_numbers(config: Config, steps: int, document_ids: bool = False, **run_arguments) -> dict:
    """One process, no pipeline: the reference."""
    reference = config_from_dict({**_as_dict(config), "distributed": {}})
    trainer = make_trainer(reference, 1, document_ids=document_ids)
    try:
        return run(trainer, steps, **run_arguments)
    finally:
        trainer.engine.close()


def _as_dict(config: Config) -> dict:
    from dataclasses import asdict

    return asdict(config)


class PerMicroBatchMeanTrainer(Trainer):
    """Negative control: each micro-batch's loss is its own token mean (summed over micro-batches)."""

    def _pipeline_micro_batches(self, inputs, targets, document_ids, scale):
        def losses(logits, target):
            token_losses = token_loss_sum(logits, target)
            return token_losses, token_losses / target.numel()

        return self.engine.pipeline.train_step_micro_batches(inputs, targets, document_ids, losses)


def one_stage_clip(trainer: Trainer) -> None:
    """Negative control: the clipping norm of this rank's stage only."""
    engine = trainer.engine

    def clip(max_norm):
        parameters = list(engine.unwrapped_model().parameters())
        norm = global_gradient_norm(parameters, engine.device)
        clip_gradients_(parameters, max_norm, norm)
        return norm

    engine.clip_grad_norm = clip


def case(config: Config, steps: int = 3, trainer_class=Trainer, patch=None, document_ids: bool = False,
         **run_arguments) -> dict:
    world_size = dist.get_world_size()
    trainer = make_trainer(config, world_size, trainer_class, document_ids)
    if patch is not None:
        patch(trainer)
    try:
        return run(trainer, steps, **run_arguments)
    finally:
        trainer.engine.close()


def scenario_pp2(shared: Path) -> dict:
    results = {}
    for schedule in ("gpipe", "1f1b"):
        for activation in ("polynorm", "swiglu"):
            results[f"pp2_{schedule}_{activation}"] = case(pipeline_config(activation, pp=2, pp_schedule=schedule))
    results["pp2_interleaved_1f1b_polynorm"] = case(
        pipeline_config(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2))
    results["pp2_interleaved_zero_bubble_polynorm"] = case(
        pipeline_config(pp=2, pp_schedule="interleaved_zero_bubble", pp_stages_per_rank=2))
    recomputed = pipeline_config(pp=2)
    recomputed.training.activation_checkpointing = "block"  # non-reentrant: a stage's backward recomputes
    results["pp2_1f1b_recomputed_blocks_polynorm"] = case(recomputed)
    results["pp2_uneven_first1_last3_polynorm"] = case(pipeline_config(pp=2, pp_first_stage_layers=1))
    results["pp2_1f1b_moe_polynorm"] = case(pipeline_config("polynorm", "moe", pp=2))
    # Packed documents: every stage's attention needs the document ids (a keyword input of each stage).
    results["pp2_1f1b_document_masks_polynorm"] = case(pipeline_config(pp=2), document_ids=True)
    # Negative controls: the library's default gradient scaling, a per-micro-batch mean, one stage's norm.
    results["control_scale_grads_default"] = case(
        pipeline_config(pp=2), patch=lambda trainer: setattr(trainer.engine.pipeline.schedule, "scale_grads", True))
    results["control_per_micro_batch_mean"] = case(pipeline_config(pp=2), trainer_class=PerMicroBatchMeanTrainer)
    results["control_one_stage_clip_norm"] = case(pipeline_config(pp=2), patch=one_stage_clip)
    # Saved after 2 of 4 steps (pp 2, 1f1b, SwiGLU); the tests resume it on 1 and on 4 pipeline ranks.
    results["save_pp2_swiglu"] = case(pipeline_config("swiglu", pp=2), steps=4, save_after=2,
                                      save_to=shared / "saved_pp2")
    results["resume_pp2_on_pp2"] = case(pipeline_config("swiglu", pp=2), steps=2, load_from=shared / "saved_pp2")
    return results


def scenario_pp4(shared: Path) -> dict:
    results = {}
    results["pp4_1f1b_polynorm"] = case(pipeline_config(pp=4, pp_schedule="1f1b"))
    results["pp4_gpipe_swiglu"] = case(pipeline_config("swiglu", pp=4, pp_schedule="gpipe"))
    results["pp2_fsdp2_polynorm"] = case(pipeline_config(pp=2, backend="fsdp"))
    results["pp2_ddp2_swiglu"] = case(pipeline_config("swiglu", pp=2, backend="ddp"))
    results["pp2_tp2_polynorm"] = case(pipeline_config(pp=2, tp=2, backend="fsdp"))
    results["pp2_tp2_swiglu"] = case(pipeline_config("swiglu", pp=2, tp=2, backend="fsdp"))
    results["pp4_1f1b_moe_polynorm"] = case(pipeline_config("polynorm", "moe", pp=4))
    results["pp2_ep2_moe_polynorm"] = case(pipeline_config("polynorm", "moe", pp=2, ep=2))
    results["resume_pp2_on_pp4"] = case(pipeline_config("swiglu", pp=4), steps=2, load_from=shared / "saved_pp2")
    results["resume_pp2_on_pp2_fsdp2"] = case(pipeline_config("swiglu", pp=2, backend="fsdp"), steps=2,
                                              load_from=shared / "saved_pp2")
    return results


SCENARIOS = {"pp2": scenario_pp2, "pp4": scenario_pp4}


def main() -> None:
    scenario, output, shared = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    finish_worker(SCENARIOS[scenario](shared), output)


if __name__ == "__main__":
    main()
