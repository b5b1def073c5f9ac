"""Evaluate a model on tasks: examples → requests → log-likelihoods → per-task metrics.

Examples are sharded over `world_size` ranks (rank r scores examples r, r + world, ...); each rank adds up
its per-example values and `all_reduce_sum` adds the ranks' sums, so every rank ends with the metrics of
the whole set, equal to one process's up to the order of float additions. Nothing here depends on how
ranks talk: the caller passes the reduction (torch.distributed for `polycom-lm eval` under torchrun, the
engine's data-parallel all-reduce in training).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from polycom_lm.data.tokenizer import Tokenizer
from polycom_lm.eval.results import TOTALS_SIZE, TaskResult, task_result, totals_index
from polycom_lm.eval.scoring import Scorer, encode_requests
from polycom_lm.eval.task import LOGLIKELIHOOD, Example, Task

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvaluationRun:
    results: list[TaskResult]
    seconds: float
    examples: int  # over all ranks

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")


def example_values(task: Task, example: Example, lls: list[float], greedy: list[bool]) -> dict[str, float]:
    """Per-example values as the harness's `process_results`: acc / acc_norm for multiple choice (argmax
    of log-likelihood, and of log-likelihood per character of the choice), acc / log-likelihood for cloze."""
    if task.output_type == LOGLIKELIHOOD:
        return {"loglikelihood": lls[0], "acc": float(greedy[0])}
    values = {"acc": float(int(np.argmax(lls)) == example.gold)}
    if example.choices:
        lengths = np.array([float(len(choice)) for choice in example.choices])
        values["acc_norm"] = float(int(np.argmax(np.array(lls) / lengths)) == example.gold)
    return values


def evaluate_task(
    task: Task,
    examples: list[Example],
    scorer: Scorer,
    tokenizer: Tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Optional[AllReduce] = None,
    forward_count: Optional[Callable[[int], int]] = None,
    keep_samples: bool = False,
) -> TaskResult:
    """One task's metrics over `examples` (this rank scores its share; see the module docstring)."""
    mine = examples[rank::world_size]
    pairs = [(request.context, request.continuation) for example in mine for request in example.requests]
    encoded = encode_requests(tokenizer, pairs)
    groups, position = [], 0
    for example in mine:
        groups.append(encoded[position : position + len(example.requests)])
        position += len(example.requests)
    scored = scorer.score(groups, forward_count=forward_count)
    totals = torch.zeros(TOTALS_SIZE, dtype=torch.float64)
    samples = [] if keep_samples else None
    for example, results in zip(mine, scored):
        lls = [result.loglikelihood for result in results]
        values = example_values(task, example, lls, [result.is_greedy for result in results])
        totals[0] += 1
        for quantity, value in values.items():
            totals[totals_index(quantity)] += value
            totals[totals_index(quantity) + 1] += value * value
        if samples is not None:
            samples.append({"loglikelihoods": lls, "gold": example.gold, **values})
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals.to(scorer.device)).cpu()
    return task_result(task.name, task.metrics, totals.tolist(), samples)


def evaluate(
    model: nn.Module,
    tokenizer: Tokenizer,
    tasks: dict[Task, list[Example]],
    *,
    max_length: int,
    batch_size: int = 32,
    share_context: bool = True,
    wrapped: bool = False,
    rank: int = 0,
    world_size: int = 1,
    all_reduce_sum: Optional[AllReduce] = None,
    keep_samples: bool = False,
) -> EvaluationRun:
    """Metrics of every task; `wrapped` for a model sharded by an engine (see `Scorer`), which then runs as
    many forwards on every rank (counts agreed through `all_reduce_sum`)."""
    scorer = Scorer(model, max_length=max_length, batch_size=batch_size, share_context=share_context, wrapped=wrapped)
    forward_count = None
    if wrapped and all_reduce_sum is not None:
        def forward_count(local: int) -> int:
            counts = torch.zeros(world_size, dtype=torch.float64, device=scorer.device)
            counts[rank] = local
            return int(all_reduce_sum(counts).max().item())
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    results = []
    try:
        for task, examples in tasks.items():
            result = evaluate_task(task, examples, scorer, tokenizer, rank=rank, world_size=world_size,
                                   all_reduce_sum=all_reduce_sum, forward_count=forward_count, keep_samples=keep_samples)
            logger.info("%s: %s (%d examples)", task.name,
                        ", ".join(f"{metric} {value:.4f}" for metric, value in result.metrics.items()), result.examples)
            results.append(result)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return EvaluationRun(results, seconds, sum(result.examples for result in results))
