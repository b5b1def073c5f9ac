"""Training: the loop (`loop.py`) with callbacks (`callbacks/`), optimizer and schedules (`optim.py`),
the trainer's own resume state and RNG (`trainer_state.py`), MFU (`flops.py`), config checks (`validation.py`), the run's
output folder (`output.py`) and the entry point `run_training` (`run.py`)."""

from polycom_lm.train.loop import Callback, StepResult, Trainer, TrainingStopped
from polycom_lm.train.run import RunResult, build_trainer, run_training
from polycom_lm.train.validation import BatchLayout, validate_config

__all__ = [
    "BatchLayout",
    "Callback",
    "RunResult",
    "StepResult",
    "Trainer",
    "TrainingStopped",
    "build_trainer",
    "run_training",
    "validate_config",
]
