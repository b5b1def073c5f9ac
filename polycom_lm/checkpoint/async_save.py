"""Asynchronous checkpoints (`training.async_checkpoint`): training goes on while a checkpoint is written.

At the step, every rank stages its model and optimizer state into CPU memory (DCP's `async_save`, which
copies every tensor before it returns) and writes its small files (trainer state, RNG, data position)
into the checkpoint's temporary folder; a background thread then writes the shards and finishes the
folder exactly as a synchronous save does (`folders.finish_checkpoint`: the `.complete` marker, the
rename, then `latest`). So `latest` only ever names a complete checkpoint, and a crash during the write
leaves a temporary folder that the next start removes.

At most one save is in flight: the next save, the end of training and a stop wait for the previous one
first. The background thread's collectives (DCP's plan exchange, the finishing barrier) run on a group
of their own (`checkpoint_group`, gloo: DCP needs a CPU backend), never on the training's.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch.distributed as dist

from polycom_lm import faults
from polycom_lm.errors import CheckpointError, first_line

logger = logging.getLogger(__name__)


def checkpoint_group() -> Optional[dist.ProcessGroup]:
    """A gloo group over every rank for the checkpoint thread (every rank calls this, in the same order),
    or None on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def group_barrier(group: Optional[dist.ProcessGroup]) -> Callable[[], None]:
    if group is None:
        return lambda: None
    return lambda: dist.barrier(group=group)


class AsyncCheckpointer:
    """Runs each checkpoint's write in a background thread, one at a time (see the module docstring)."""

    def __init__(self, record_write: Callable[[float], None] = lambda seconds: None):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._step: Optional[int] = None
        self._record_write = record_write

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, upload: Future, finish: Callable[[], None]) -> None:
        """Finish checkpoint `step` in the background once `upload` (DCP's write) completes. The caller has
        waited for the previous save (`wait`)."""
        assert not self.in_flight, "one checkpoint at a time: wait() for the previous one first"
        started = time.perf_counter()

        def write() -> None:
            try:
                upload.result()
                faults.crash_point(f"async-write@{step}")  # shards written, folder not yet complete
                finish()
                seconds = time.perf_counter() - started
                self._record_write(seconds)
                logger.info("checkpoint step_%d written in the background in %.2f s", step, seconds)
            except BaseException as error:  # noqa: BLE001  re-raised in the training thread by wait()
                self._error = error

        self._step = step
        self._thread = threading.Thread(target=write, name=f"polycom-checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; its failure becomes a one-line CheckpointError."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"writing checkpoint step_{self._step} in the background failed "
                                  f"({type(error).__name__}: {first_line(error)}); the previous checkpoint is intact")

    def close(self) -> None:
        """After an error elsewhere: let the write in flight finish, reporting (not raising) its failure."""
        try:
            self.wait()
        except CheckpointError as error:
            logger.error("%s", error)
