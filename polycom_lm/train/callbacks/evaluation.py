"""Validation loss and perplexity on each configured set every `training.eval_every_steps` and at the end."""

from __future__ import annotations

from polycom_lm.train.evaluate import evaluate
from polycom_lm.train.loop import Callback, Trainer


class EvaluationCallback(Callback):
    def __init__(self, validation_sets: dict, evaluated: tuple[int, list] | None = None):
        """`evaluated`: (step, rows) of an evaluation a resumed run already logged at its starting step."""
        self.validation_sets = validation_sets  # name -> shard folder
        self._last_evaluated_step: int | None = evaluated[0] if evaluated else None
        self._previous_rows = evaluated[1] if evaluated else []

    def on_train_start(self, trainer: Trainer) -> None:
        if self._previous_rows and trainer.is_last_step():
            # Re-running a finished run: report its final evaluation instead of repeating it.
            for callback in trainer.callbacks:
                if callback is not self and hasattr(callback, "record_evaluation"):
                    callback.record_evaluation(self._previous_rows)

    def _run(self, trainer: Trainer) -> None:
        if not self.validation_sets or self._last_evaluated_step == trainer.state.step:
            return
        rows = evaluate(trainer, self.validation_sets)
        self._last_evaluated_step = trainer.state.step
        for callback in trainer.callbacks:
            callback.on_evaluation(trainer, rows)

    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.config.training.eval_every_steps
        if every > 0 and trainer.state.step % every == 0:
            self._run(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._run(trainer)
