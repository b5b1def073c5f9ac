"""Console progress bar with loss and tokens/s (rank 0; added by the CLI, which owns the console)."""

from __future__ import annotations

import sys
from typing import Any

from polycom_lm.train.loop import Callback, Trainer


class ProgressCallback(Callback):
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._bar = None

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=trainer.config.training.max_steps,
            initial=trainer.state.step,
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
            leave=True,
        )

    def on_step_end(self, trainer: Trainer) -> None:
        self._bar.update(trainer.state.step - self._bar.n)

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{row['mfu']:.1%}",
                              refresh=False)

    def on_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._bar.write(
                f"step {row['step']}: validation set {row['name']!r}: loss {row['loss']:.4f} ppl {row['perplexity']:.2f}",
                file=self.stream,
            )

    def on_downstream_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        self._bar.write(downstream_line(rows), file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def downstream_line(rows: list[dict[str, Any]]) -> str:
    """'step 100: hellaswag acc 0.2650 acc_norm 0.2700, lambada ...' from downstream rows."""
    by_task: dict[str, list[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(f"{row['metric']} {row['value']:.4g}")
    summary = ", ".join(f"{task} {' '.join(parts)}" for task, parts in by_task.items())
    return f"step {rows[0]['step']}: downstream {summary}"


class ConsoleLogCallback(Callback):
    """One plain line per logged step, for consoles without a progress bar (batch jobs, piped output)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        print(
            f"step {row['step']}/{trainer.config.training.max_steps}: loss {row['loss']:.4f} lr {row['lr']:.3g} "
            f"grad_norm {row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tokens/s MFU {row['mfu']:.1%}",
            file=self.stream,
            flush=True,
        )

    def on_downstream_evaluation(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        print(downstream_line(rows), file=self.stream, flush=True)
