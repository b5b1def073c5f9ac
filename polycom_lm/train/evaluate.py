"""Validation loss (mean token cross-entropy, nats) and perplexity over whole validation sets.

Each rank reads a disjoint part of every set (`ValidationDataset.batches`). Ranks may get different
numbers of batches; since sharded engines run collectives inside forward, every rank runs the same
number of forwards, the short ones repeating a batch whose losses they then do not count.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from polycom_lm.train.loop import Trainer

logger = logging.getLogger(__name__)


def _batch_counts(trainer: "Trainer", local: int) -> list[int]:
    """Number of validation batches of every data-parallel rank (one small all-reduce)."""
    engine = trainer.engine
    counts = torch.zeros(trainer.layout.dp_world_size, dtype=torch.float64, device=engine.device)
    counts[engine.dp_rank] = local
    return [int(value) for value in engine.all_reduce_sum(counts).tolist()]


@torch.no_grad()
def evaluate_set(trainer: "Trainer", shard: Path) -> tuple[float, int]:
    """(mean token loss, number of target tokens) of one validation set, over all ranks."""
    from polycom_lm.data import ValidationDataset

    engine, config = trainer.engine, trainer.config
    micro_batch_size = config.evaluation.micro_batch_size or config.training.micro_batch_size
    dataset = ValidationDataset(shard, config.training.seq_len)
    batches = list(
        dataset.batches(micro_batch_size, engine.dp_rank, trainer.layout.dp_world_size, config.evaluation.max_tokens)
    )
    most = max(_batch_counts(trainer, len(batches)))
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, token count
    for index in range(most):
        batch = batches[min(index, len(batches) - 1)] if batches else None
        if batch is None:  # this rank got no data at all; forward something of the right shape
            batch = {"input_ids": torch.zeros(1, config.training.seq_len + 1, dtype=torch.long)}
        tokens = batch["input_ids"].to(engine.device, non_blocking=True)
        document_ids = batch.get("document_ids")
        if engine.pipeline is not None:  # forward through every stage; the last one's loss, on all
            if document_ids is not None:
                document_ids = document_ids[:, :-1].to(engine.device)
            with trainer.autocast():
                loss_sum = engine.pipeline.forward_loss_sum(tokens[:, :-1], tokens[:, 1:], document_ids, _loss_sum)
            if index < len(batches):
                totals[0] += loss_sum
                totals[1] += tokens[:, 1:].numel()
            continue
        with trainer.autocast():
            if document_ids is None:
                logits = engine.model(tokens[:, :-1])
            else:
                logits = engine.model(tokens[:, :-1], document_ids=document_ids[:, :-1].to(engine.device))
        if index < len(batches):
            totals[0] += F.cross_entropy(
                logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
            ).to(torch.float64)
            totals[1] += tokens[:, 1:].numel()
    totals = engine.all_reduce_sum(totals)
    loss_sum, count = totals.tolist()
    return (loss_sum / count if count else float("nan")), int(count)


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def evaluate(trainer: "Trainer", validation_sets: dict[str, Path]) -> list[dict[str, Any]]:
    """One `kind: eval` row per validation set at the trainer's current step."""
    model = trainer.engine.model
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name, shard in validation_sets.items():
            loss, count = evaluate_set(trainer, Path(shard))
            perplexity = math.exp(loss) if loss < 700 else float("inf")
            logger.info("step %d: validation set %r: loss %.4f perplexity %.2f (%d tokens)",
                        trainer.state.step, name, loss, perplexity, count)
            rows.append(
                {
                    "kind": "eval",
                    "step": trainer.state.step,
                    "tokens": trainer.state.tokens,
                    "name": name,
                    "loss": loss,
                    "perplexity": perplexity,
                    "eval_tokens": count,
                }
            )
    finally:
        model.train(was_training)
    return rows
