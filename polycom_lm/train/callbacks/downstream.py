"""Zero-shot tasks during training (`evaluation.downstream`): every `every_steps` steps and after the final
step, the tasks of `polycom-lm eval` are scored and one row per (task, metric) goes to every callback's
`on_downstream_evaluation`: `{kind: downstream, step, tokens, task, metric, value, stderr, examples}`.

Task names and data files are checked when the callback is built, before training writes anything. Each
data-parallel rank scores its share of the examples: with replicated weights (DDP, ZeRO 1/2) on the plain
model, with the shared-prefix KV cache; with sharded ones (FSDP, tensor or expert parallel, ZeRO-3)
through the engine's model, every rank running the same number of forwards.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from polycom_lm.config import Config
from polycom_lm.distributed.pipeline import PipelineForward
from polycom_lm.eval import get_task
from polycom_lm.eval.runner import evaluate
from polycom_lm.train.loop import Callback, Trainer

logger = logging.getLogger(__name__)


def _replicated(model: nn.Module, config: Config) -> bool:
    """Whether every rank holds all of `model`'s weights and runs it without collectives."""
    if config.distributed.tp > 1 or config.distributed.ep > 1:
        return False
    return all(type(p) in (torch.Tensor, nn.Parameter) and not hasattr(p, "ds_id") for p in model.parameters())


class DownstreamEvaluationCallback(Callback):
    def __init__(self, config: Config, tasks: dict):
        self.config = config
        self.settings = config.evaluation.downstream
        self.tasks = tasks  # Task -> examples
        self.tokenizer = None
        self._start_step: Optional[int] = None
        self._last_step: Optional[int] = None

    @classmethod
    def build(cls, config: Config) -> Optional["DownstreamEvaluationCallback"]:
        """None when no tasks are configured; reads every task's examples now (one-line errors)."""
        settings = config.evaluation.downstream
        if not settings.tasks:
            return None
        data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else None
        tasks = {}
        for name in settings.tasks:
            task = get_task(name)
            tasks[task] = task.examples(data_dir, settings.limit)
        return cls(config, tasks)

    def bind(self, tokenizer_dir: Path) -> "DownstreamEvaluationCallback":
        """Use the run's tokenizer (known once the data is prepared)."""
        from polycom_lm.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        return self

    def on_train_start(self, trainer: Trainer) -> None:
        self._start_step = trainer.state.step

    def on_step_end(self, trainer: Trainer) -> None:
        every = self.settings.every_steps
        if every > 0 and trainer.state.step % every == 0 and not trainer.is_last_step():
            self._run(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        # A run resumed at its final step already logged this evaluation before its final checkpoint.
        if self._start_step is not None and trainer.state.step > self._start_step:
            self._run(trainer)

    def _run(self, trainer: Trainer) -> None:
        if self._last_step == trainer.state.step:
            return
        self._last_step = trainer.state.step
        engine = trainer.engine
        plain = engine.unwrapped_model()
        replicated = _replicated(plain, self.config)
        # Compiled blocks (training.compile) run eagerly here: the cached, padded inference shapes would
        # only add recompilations next to the training graph.
        model = plain if replicated else engine.model
        if engine.pipeline is not None:  # logits through a forward-only schedule; the last stage's results
            model, replicated = PipelineForward(engine.pipeline, plain), False
        with trainer.autocast(), torch.compiler.set_stance("force_eager"):
            run = evaluate(
                model, self.tokenizer, self.tasks,
                max_length=self.config.model.max_seq_len, batch_size=self.settings.batch_size,
                wrapped=not replicated, rank=engine.dp_rank, world_size=engine.dp_world_size,
                all_reduce_sum=engine.all_reduce_sum if engine.dp_world_size > 1 else None,
            )
        if engine.pipeline is not None:
            run = engine.pipeline.share_from_last_stage(run)
        rows: list[dict[str, Any]] = []
        for result in run.results:
            for metric, value in result.metrics.items():
                rows.append({
                    "kind": "downstream", "step": trainer.state.step, "tokens": trainer.state.tokens,
                    "task": result.task, "metric": metric, "value": value, "stderr": result.stderr[metric],
                    "examples": result.examples,
                })
        logger.info("step %d: downstream evaluation of %d examples in %.1f s", trainer.state.step, run.examples,
                    run.seconds)
        for callback in trainer.callbacks:
            callback.on_downstream_evaluation(trainer, rows)
