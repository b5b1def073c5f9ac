"""Per-task metrics from summed per-example values, with standard errors as lm-evaluation-harness gives
them, and their two renderings: a console table and a JSON document.

Every metric is a mean over examples, so ranks only need to add up (count, Σx, Σx²): `acc`, `acc_norm`
(0/1 per example) and the continuation log-likelihood of cloze tasks. Standard error of a mean: the
sample standard deviation (n - 1) over sqrt(n), the harness's `mean_stderr`. Perplexity is exp(-mean
log-likelihood) per example (the harness's `perplexity` aggregation, LAMBADA's per-word perplexity); its
standard error is the delta-method one, perplexity × stderr(mean log-likelihood), where the harness
bootstraps (100,000 resamples), which agrees to the first digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Index of each summed value in a task's totals vector: count, then (Σx, Σx²) per quantity.
QUANTITIES = ("acc", "acc_norm", "loglikelihood")
TOTALS_SIZE = 1 + 2 * len(QUANTITIES)


def totals_index(quantity: str) -> int:
    return 1 + 2 * QUANTITIES.index(quantity)


@dataclass
class TaskResult:
    task: str
    examples: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    samples: Optional[list[dict[str, Any]]] = field(default=None, repr=False)


def _mean_and_stderr(count: float, total: float, squares: float) -> tuple[float, float]:
    mean = total / count
    if count < 2:
        return mean, float("nan")
    variance = max(squares - count * mean * mean, 0.0) / (count - 1)
    return mean, math.sqrt(variance / count)


def task_result(task: str, metrics: tuple[str, ...], totals: list[float], samples=None) -> TaskResult:
    """The metrics (in the task's order) from its summed totals vector."""
    count = totals[0]
    values: dict[str, float] = {}
    errors: dict[str, float] = {}
    for metric in metrics:
        if count == 0:
            values[metric], errors[metric] = float("nan"), float("nan")
            continue
        if metric == "perplexity":
            start = totals_index("loglikelihood")
            mean, stderr = _mean_and_stderr(count, totals[start], totals[start + 1])
            values[metric] = math.exp(-mean) if -mean < 700 else float("inf")
            errors[metric] = values[metric] * stderr
        else:
            start = totals_index(metric)
            values[metric], errors[metric] = _mean_and_stderr(count, totals[start], totals[start + 1])
    return TaskResult(task, int(count), values, errors, samples)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 or not math.isfinite(value) else f"{value:.4g}"


def format_table(results: list[TaskResult]) -> str:
    """A fixed-width table: task, metric, value, stderr, examples."""
    lines = [f"{'task':<16}{'metric':<12}{'value':>12}{'stderr':>12}{'examples':>10}"]
    for result in results:
        for position, (metric, value) in enumerate(result.metrics.items()):
            name = result.task if position == 0 else ""
            count = str(result.examples) if position == 0 else ""
            lines.append(f"{name:<16}{metric:<12}{_number(value):>12}{_number(result.stderr[metric]):>12}{count:>10}")
    return "\n".join(lines)


def _json_number(value: float) -> Any:
    return value if math.isfinite(value) else str(value)


def results_document(results: list[TaskResult], **header: Any) -> dict[str, Any]:
    """The JSON document: `header` fields (model, step, tokens, ...) and per task its metrics, their
    standard errors and the number of examples."""
    return {
        **header,
        "results": {
            result.task: {
                "examples": result.examples,
                **{metric: _json_number(value) for metric, value in result.metrics.items()},
                **{f"{metric}_stderr": _json_number(value) for metric, value in result.stderr.items()},
            }
            for result in results
        },
    }
