"""The report's figures (matplotlib, headless Agg backend), one PNG each. Every figure has axis labels with
units, a legend naming the variants (one colour per variant, shared by all figures), and a log-scaled loss
axis when the plotted losses span more than a factor of 3."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from polycom_lm.study.runs import RunRecord  # noqa: E402

DPI = 130
_LAYER = re.compile(r"layers\.(\d+)\.")


def _tokens_text(value: float, _position: Any = None) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


TOKENS = FuncFormatter(_tokens_text)


def colours(variants: list[str]) -> dict[str, Any]:
    """A distinct colour per variant: matplotlib's tab10 up to 10 variants, tab20 up to 20, and beyond that
    (a ladder's sizes × activations) evenly spaced along matplotlib's turbo map, whose two ends differ."""
    if len(variants) <= 10:
        return {variant: plt.get_cmap("tab10")(index) for index, variant in enumerate(variants)}
    if len(variants) <= 20:
        return {variant: plt.get_cmap("tab20")(index) for index, variant in enumerate(variants)}
    spread = plt.get_cmap("turbo")
    return {variant: spread((index + 0.5) / len(variants)) for index, variant in enumerate(variants)}


def smooth(values: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average with a window of about 1/15 of the points (TensorBoard's)."""
    if len(values) < 3:
        return values
    weight = 1.0 - 1.0 / max(1.0, len(values) / 15.0)
    averaged, out = 0.0, np.empty_like(values, dtype=float)
    for index, value in enumerate(values):
        averaged = weight * averaged + (1 - weight) * value
        out[index] = averaged / (1 - weight ** (index + 1))
    return out


PLAIN = FuncFormatter(lambda value, _position=None: f"{value:g}")


def _log_if_spanning(axis, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 3:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(PLAIN)  # 4, 6, 8 rather than 4×10⁰
        axis.yaxis.set_minor_formatter(PLAIN)


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(row["tokens"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    if not pairs:
        return np.array([]), np.array([])
    tokens, values = zip(*pairs)
    return np.asarray(tokens, dtype=float), np.asarray(values, dtype=float)


def training_loss(groups: dict[str, list[RunRecord]], palette: dict, path: Path) -> Path:
    figure, (whole, tail) = plt.subplots(1, 2, figsize=(13, 4.6))
    everything: list[float] = []
    tail_range: list[float] = []
    for variant, runs in groups.items():
        for index, run in enumerate(runs):
            tokens, loss = _series(run.train, "loss")
            if not len(tokens):
                continue
            smoothed = smooth(loss)
            everything += list(loss)
            label = f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if index == 0 else None
            for axis in (whole, tail):
                axis.plot(tokens, loss, color=palette[variant], alpha=0.2, linewidth=0.8)
                axis.plot(tokens, smoothed, color=palette[variant], linewidth=1.6, label=label if axis is tail else None)
            late = tokens >= tokens[-1] / 2
            tail_range += list(smoothed[late])
    _log_if_spanning(whole, everything)
    whole.set_title("Training loss, whole run (light: raw, solid: smoothed)")
    tail.set_title("Second half of training (zoomed)")
    if tail_range:
        low, high = min(tail_range), max(tail_range)
        margin = 0.15 * (high - low) + 1e-3
        tail.set_ylim(low - margin, high + margin)
        last = max(run.train[-1]["tokens"] for runs in groups.values() for run in runs)
        tail.set_xlim(last / 2, last * 1.01)
    for axis in (whole, tail):
        axis.set_xlabel("training tokens")
        axis.set_ylabel("cross-entropy loss (nats/token)")
        axis.xaxis.set_major_formatter(TOKENS)
        axis.grid(alpha=0.3, which="both")
    tail.legend(loc="upper right", fontsize=8)
    return _save(figure, path)


def _mean_band(axis, runs: list[RunRecord], rows_of, key: str, colour, label: str) -> None:
    """Mean over runs at each token count they share, with a ± std band where there are several runs."""
    by_tokens: dict[float, list[float]] = {}
    for run in runs:
        for tokens, value in zip(*_series(rows_of(run), key)):
            by_tokens.setdefault(tokens, []).append(value)
    if not by_tokens:
        return
    xs = np.array(sorted(by_tokens))
    means = np.array([np.mean(by_tokens[x]) for x in xs])
    stds = np.array([np.std(by_tokens[x], ddof=1) if len(by_tokens[x]) > 1 else 0.0 for x in xs])
    axis.plot(xs, means, marker="o", markersize=3.5, color=colour, label=label, linewidth=1.5)
    if len(runs) > 1:
        axis.fill_between(xs, means - stds, means + stds, color=colour, alpha=0.2, linewidth=0)


def _grid_figure(count: int, width: float = 4.8, height: float = 3.6, columns: int = 3):
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def validation(groups: dict[str, list[RunRecord]], palette: dict, path: Path) -> Optional[Path]:
    names = sorted({row["name"] for runs in groups.values() for run in runs for row in run.evaluations})
    if not names:
        return None
    figure, axes = _grid_figure(len(names))
    for axis, name in zip(axes, names):
        values: list[float] = []
        for variant, runs in groups.items():
            rows_of = lambda run, name=name: [row for row in run.evaluations if row["name"] == name]  # noqa: E731
            _mean_band(axis, runs, rows_of, "loss", palette[variant], variant)
            values += [row["loss"] for run in runs for row in rows_of(run) if isinstance(row["loss"], (int, float))]
        _log_if_spanning(axis, values)
        axis.set_title(f"Validation set {name!r} (mean ± std over seeds)")
        axis.set_xlabel("training tokens")
        axis.set_ylabel("validation loss (nats/token)")
        axis.xaxis.set_major_formatter(TOKENS)
        secondary = axis.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.clip(p, 1e-300, None))))
        secondary.set_ylabel("perplexity")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _final_points(axis, groups: dict[str, list[RunRecord]], palette: dict, rows_of) -> None:
    """One column per variant: mean ± std over seeds of each run's last value, and the seeds as dots."""
    for position, (variant, runs) in enumerate(groups.items()):
        values = [rows[-1]["value"] for rows in map(rows_of, runs) if rows and isinstance(rows[-1]["value"], (int, float))]
        if not values:
            continue
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        axis.errorbar([position], [float(np.mean(values))], yerr=[std], fmt="o", color=palette[variant], capsize=5,
                      markersize=7, linewidth=1.5)
        axis.scatter([position + 0.15] * len(values), values, color=palette[variant], s=10, alpha=0.6)
    axis.set_xticks(range(len(groups)), list(groups), fontsize=8)
    axis.set_xlim(-0.5, len(groups) - 0.5)


def downstream(groups: dict[str, list[RunRecord]], palette: dict, path: Path) -> Optional[Path]:
    """Zero-shot metrics over training tokens, or, when every run was evaluated once (at its end), one
    column per variant (mean ± std over seeds, the seeds as dots)."""
    names = sorted({f"{row['task']}/{row['metric']}" for runs in groups.values() for run in runs for row in run.downstream})
    if not names:
        return None
    figure, axes = _grid_figure(len(names))
    for axis, name in zip(axes, names):
        task, _, metric = name.partition("/")
        rows_of = lambda run, t=task, m=metric: [r for r in run.downstream if r["task"] == t and r["metric"] == m]  # noqa: E731
        token_counts = {row["tokens"] for runs in groups.values() for run in runs for row in rows_of(run)}
        if len(token_counts) == 1:
            _final_points(axis, groups, palette, rows_of)
            axis.set_title(f"{task}, after {_tokens_text(next(iter(token_counts)))} tokens")
            axis.set_xlabel("mean ± std over seeds (dots: seeds)")
        else:
            for variant, runs in groups.items():
                _mean_band(axis, runs, rows_of, "value", palette[variant], variant)
            axis.set_title(f"{task} (mean ± std over seeds)")
            axis.set_xlabel("training tokens")
            axis.xaxis.set_major_formatter(TOKENS)
            axis.legend(fontsize=8)
        if metric == "perplexity":
            axis.set_yscale("log")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    return _save(figure, path)


def throughput(groups: dict[str, list[RunRecord]], palette: dict, path: Path) -> Path:
    runs = [(variant, run) for variant, members in groups.items() for run in members]
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(runs) + 1.4))
    positions = np.arange(len(runs))
    speeds = [run.tokens_per_s() for _, run in runs]
    axis.barh(positions, speeds, color=[palette[variant] for variant, _ in runs])
    axis.set_yticks(positions, [run.name for _, run in runs], fontsize=8)
    axis.invert_yaxis()
    for position, speed in zip(positions, speeds):
        if math.isfinite(speed):
            axis.text(speed, position, f" {speed:,.0f}", va="center", fontsize=7)
    finite = [speed for speed in speeds if math.isfinite(speed)]
    if finite:
        axis.set_xlim(0, max(finite) * 1.15)
    axis.set_xlabel("throughput (training tokens/s, median over logged steps)")
    axis.set_title("Throughput per run")
    axis.grid(alpha=0.3, axis="x")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[variant]) for variant in groups]
    axis.legend(handles, list(groups), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, path)


def coefficient_series(run: RunRecord) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """layer → parameter name (w0, .., bias, negative_slope) → (tokens, values), from the logged rows."""
    layers: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    keys = sorted({key for row in run.train for key in row if key.startswith("coefficients/")})
    for key in keys:
        match = _LAYER.search(key)
        if match is None:
            continue
        tokens, values = _series(run.train, key)
        layers.setdefault(int(match.group(1)), {})[key.rpartition("/")[2]] = (tokens, values)
    return layers


def coefficients(variant: str, runs: list[RunRecord], path: Path) -> Optional[Path]:
    series = [coefficient_series(run) for run in runs]
    if not series[0]:
        return None
    layers = sorted(series[0])
    if max(len(parameters) for parameters in series[0].values()) > 12:
        return None  # per-expert coefficients: too many lines for small plots
    figure, axes = _grid_figure(len(layers), width=3.4, height=2.5, columns=4)
    palette = plt.get_cmap("tab10")
    names = sorted(series[0][layers[0]], key=lambda n: (not n.startswith("w"), int(n[1:]) if n[1:].isdigit() else 0, n))
    for axis, layer in zip(axes, layers):
        for seed_index, run_series in enumerate(series):
            for index, name in enumerate(names):
                if name not in run_series.get(layer, {}):
                    continue
                tokens, values = run_series[layer][name]
                axis.plot(tokens, values, color=palette(index), linewidth=1.3 if seed_index == 0 else 0.7,
                          alpha=1.0 if seed_index == 0 else 0.45, linestyle="-" if seed_index == 0 else "--",
                          label=name if seed_index == 0 else None)
        axis.set_title(f"layer {layer}", fontsize=9)
        axis.xaxis.set_major_formatter(TOKENS)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in axes:
        axis.set_xlabel("training tokens", fontsize=8)
        axis.set_ylabel("coefficient value", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    seeds = f"seed {runs[0].seed} solid" + (", other seeds dashed" if len(runs) > 1 else "")
    figure.suptitle(f"Learned coefficients of {variant} per layer\n(w0 multiplies the highest power; {seeds})",
                    fontsize=10)
    figure.tight_layout()
    figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), fontsize=8, title="coefficient")
    return _save(figure, path)


def analysis(groups: dict[str, list[RunRecord]], palette: dict, folder: Path) -> list[Path]:
    """effective_rank.png and cosine_similarity.png of the runs that were analysed (none: no figures)."""
    analysed = {variant: [run.analysis for run in runs if run.analysis] for variant, runs in groups.items()}
    return analysis_figures({variant: items for variant, items in analysed.items() if items}, palette, folder)


def analysis_figures(analysed: dict[str, list[dict[str, Any]]], palette: dict, folder: Path) -> list[Path]:
    """effective_rank.png (FFN in / out projections per layer) and cosine_similarity.png, from `analyze`
    results grouped by variant."""
    if not analysed:
        return []
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for axis, matrix, title in zip(axes, ("in_proj", "out_proj"), ("FFN in-projection", "FFN out-projection")):
        for variant, items in analysed.items():
            values = np.array([item["effective_rank"][matrix] for item in items], dtype=float)
            layers = np.arange(values.shape[1])
            errors = values.std(0, ddof=1) if len(values) > 1 else None
            axis.errorbar(layers, values.mean(0), yerr=errors, marker="o", markersize=3.5, capsize=2,
                          color=palette[variant], label=variant)
        limit = next(iter(analysed.values()))[0]["effective_rank"].get("max_rank", {}).get(matrix)
        axis.set_title(title + (f" (full rank: {limit})" if limit else ""))
        axis.set_xlabel("layer")
        axis.set_ylabel("effective rank (exp of singular-value entropy)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Effective rank of the FFN weights per layer (mean ± std over seeds; experts averaged)")
    figure.tight_layout()
    paths = [_save(figure, folder / "effective_rank.png")]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for variant, items in analysed.items():
        values = np.array([item["cosine_similarity"]["values"] for item in items], dtype=float)
        layers = np.arange(values.shape[1])
        errors = values.std(0, ddof=1) if len(values) > 1 else None
        axis.errorbar(layers, values.mean(0), yerr=errors, marker="o", markersize=3.5, capsize=2,
                      color=palette[variant], label=variant)
    axis.set_title("Cosine similarity of each layer's input and output\n(mean over validation tokens; ± std over seeds)")
    axis.set_xlabel("layer")
    axis.set_ylabel("cos(hidden state in, hidden state out)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    paths.append(_save(figure, folder / "cosine_similarity.png"))
    return paths
