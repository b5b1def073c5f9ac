"""Callbacks plugged into the training loop: metrics file, wandb, TensorBoard, progress bar, evaluation,
checkpointing, profiling, downstream tasks. Each is one small class implementing some hooks of `polycom_lm.train.loop.Callback`."""

from polycom_lm.train.callbacks.checkpointing import CheckpointCallback
from polycom_lm.train.callbacks.downstream import DownstreamEvaluationCallback
from polycom_lm.train.callbacks.evaluation import EvaluationCallback
from polycom_lm.train.callbacks.metrics_file import MetricsFileCallback
from polycom_lm.train.callbacks.profiling import ProfilerCallback
from polycom_lm.train.callbacks.progress import ConsoleLogCallback, ProgressCallback
from polycom_lm.train.callbacks.tensorboard import TensorBoardCallback
from polycom_lm.train.callbacks.wandb import WandbCallback

__all__ = [
    "CheckpointCallback",
    "DownstreamEvaluationCallback",
    "EvaluationCallback",
    "MetricsFileCallback",
    "ProfilerCallback",
    "ConsoleLogCallback",
    "ProgressCallback",
    "TensorBoardCallback",
    "WandbCallback",
]
