"""torch.profiler over steps [training.profile_start_step, + profile_num_steps): a Chrome trace per rank
under `<output_dir>/profile/` (open in chrome://tracing or Perfetto) and a table of the top operators in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from polycom_lm.train.loop import Callback, Trainer

logger = logging.getLogger(__name__)


class ProfilerCallback(Callback):
    def __init__(self, output_dir: Path, start_step: int, num_steps: int, rank: int):
        self.output_dir = Path(output_dir)
        self.start_step = start_step  # 1-based number of the first profiled step
        self.num_steps = num_steps
        self.rank = rank
        self._profiler = None

    def on_step_start(self, trainer: Trainer) -> None:
        if self._profiler is None and trainer.state.step + 1 == self.start_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.engine.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profiler.__enter__()

    def on_step_end(self, trainer: Trainer) -> None:
        if self._profiler is not None and trainer.state.step + 1 >= self.start_step + self.num_steps:
            self._finish()

    def on_train_end(self, trainer: Trainer) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        trace = self.output_dir / f"trace_rank{self.rank}.json"
        profiler.export_chrome_trace(str(trace))
        logger.info("profiler trace written to %s; top operators:\n%s", trace,
                    profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    def close(self) -> None:
        self._finish()
