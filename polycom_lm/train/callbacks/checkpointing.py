"""Save a checkpoint every `training.save_every_steps` and at the end of training."""

from __future__ import annotations

from polycom_lm.train.loop import Callback, Trainer


class CheckpointCallback(Callback):
    def on_step_end(self, trainer: Trainer) -> None:
        every = trainer.config.training.save_every_steps
        if every > 0 and trainer.state.step % every == 0 and not trainer.is_last_step():
            trainer.save_checkpoint()

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()
