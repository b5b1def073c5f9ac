"""Per-variant statistics over seeds: mean ± sample standard deviation, and differences to a baseline
with the standard error of a difference of two independent means (Welch): sqrt(s_a²/n_a + s_b²/n_b)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from polycom_lm.study.runs import RunRecord

BASELINE_ACTIVATION = "swiglu"
# Model keys that make two runs different models (the activation's own settings are what a study varies).
SHAPE_KEYS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_size",
              "max_seq_len", "tie_embeddings", "qk_norm", "moe")


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one value
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"mean": _json_number(self.mean), "std": _json_number(self.std), "n": self.n}

    def text(self, digits: int = 4) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1 or math.isnan(self.std):
            return _number(self.mean, digits)
        return f"{_number(self.mean, digits)} ± {_number(self.std, digits)}"


def _number(value: float, digits: int, sign: str = "") -> str:
    """`digits` decimals, or 4 significant digits in scientific notation from 1e5 on (perplexities of
    untrained models reach 1e8: their decimals say nothing)."""
    if math.isfinite(value) and abs(value) >= 1e5:
        return f"{value:{sign}.3e}"
    return f"{value:{sign}.{digits}f}"


def _json_number(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def summarize(values: Iterable[float]) -> Summary:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return Summary(math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return Summary(statistics.fmean(finite), std, len(finite))


@dataclass(frozen=True)
class Difference:
    delta: float
    standard_error: float  # nan when either side has a single run

    def to_json(self) -> dict[str, Any]:
        return {"delta": _json_number(self.delta), "standard_error": _json_number(self.standard_error)}

    def text(self, digits: int = 4) -> str:
        if math.isnan(self.delta):
            return "—"
        if math.isnan(self.standard_error):
            return _number(self.delta, digits, "+")
        return f"{_number(self.delta, digits, '+')} ± {_number(self.standard_error, digits)}"


def difference(value: Summary, baseline: Summary) -> Difference:
    if value.n == 0 or baseline.n == 0:
        return Difference(math.nan, math.nan)
    if value.n < 2 or baseline.n < 2:
        return Difference(value.mean - baseline.mean, math.nan)
    return Difference(value.mean - baseline.mean, math.sqrt(value.std**2 / value.n + baseline.std**2 / baseline.n))


def group_by_variant(records: list[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.variant, []).append(record)
    return groups


def variant_statistics(runs: list[RunRecord]) -> dict[str, Any]:
    """Summaries over the runs (seeds) of one variant."""
    validation_sets = sorted({name for run in runs for name in run.final_validation()})
    downstream = sorted({name for run in runs for name in run.final_downstream()})
    return {
        "runs": [run.name for run in runs],
        "seeds": [run.seed for run in runs],
        "activation": runs[0].activation,
        "learning_rates": sorted({run.config.optimizer.lr for run in runs}),
        "parameters": summarize(run.parameters for run in runs),
        "tokens": summarize(run.train[-1]["tokens"] for run in runs),
        "tokens_per_s": summarize(run.tokens_per_s() for run in runs),
        "train_loss": summarize(run.final_train_loss() for run in runs),
        "validation": {name: summarize(run.final_validation().get(name, math.nan) for run in runs) for name in validation_sets},
        "downstream": {name: summarize(run.final_downstream().get(name, math.nan) for run in runs) for name in downstream},
    }


def baseline_variant(groups: dict[str, list[RunRecord]]) -> Optional[str]:
    """The SwiGLU variant when there is exactly one; None otherwise."""
    candidates = [variant for variant, runs in groups.items() if runs[0].activation == BASELINE_ACTIVATION]
    return candidates[0] if len(candidates) == 1 else None


def differences(stats: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Difference]]:
    """Per variant and metric, the difference of means to the baseline variant."""
    base = stats[baseline]
    result: dict[str, dict[str, Difference]] = {}
    for variant, values in stats.items():
        row = {"train_loss": difference(values["train_loss"], base["train_loss"]),
               "tokens_per_s": difference(values["tokens_per_s"], base["tokens_per_s"])}
        for group in ("validation", "downstream"):
            for name, summary in values[group].items():
                if name in base[group]:
                    row[f"{group}/{name}"] = difference(summary, base[group][name])
        result[variant] = row
    return result


def consistency_notes(records: list[RunRecord], groups: dict[str, list[RunRecord]]) -> list[str]:
    """Flags for comparisons that are not like for like: different model shapes, token budgets or data."""
    notes = []
    for key in SHAPE_KEYS:
        values = {record.name: getattr(record.config.model, key) for record in records}
        if len({repr(value) for value in values.values()}) > 1:
            shown = ", ".join(f"{name}: {value}" for name, value in list(values.items())[:6])
            notes.append(f"runs of different model sizes: model.{key} differs ({shown}); compare their losses with care")
    tokens = {record.name: record.config.training.max_steps * record.config.training.seq_len
              * record.config.training.global_batch_size for record in records}
    if max(tokens.values()) > 1.01 * min(tokens.values()):
        notes.append(f"runs of different token budgets: from {min(tokens.values()):,} to {max(tokens.values()):,} tokens")
    sources = {repr([entry.source for entry in record.config.data.train]) for record in records}
    if len(sources) > 1:
        notes.append("runs trained on different data (data.train differs)")
    for variant, runs in groups.items():
        seeds = [run.seed for run in runs]
        if len(set(seeds)) < len(seeds):
            notes.append(f"variant {variant}: several runs share a seed ({seeds}); they are not independent repeats")
    return notes
