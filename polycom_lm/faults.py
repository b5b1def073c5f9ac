"""Deliberate faults, set through the environment: how tests put a real kill, stall or error at an exact
moment of a real run (also under torchrun, where no test code runs inside the workers). Unset, each
check is one dictionary lookup.

- `POLYCOM_LM_CRASH_AT=POINT[:STEP]`: SIGKILL this process at a checkpoint save's point
  (`complete`, `between-renames`, `latest`, `async-write`; `checkpoint/folders.py`).
- `POLYCOM_LM_FAULT=ACTION:RANK:STEP[:SECONDS]`: when step STEP has read its batch, on global rank RANK,
  `sleep` SECONDS (a stalled rank), `kill` (SIGKILL itself: a lost worker) or `fail` (raise a DataError: a
  rank whose input broke). Only in a process that started the run at step 1: workers that torchrun
  restarts, and runs started again, resume from a checkpoint and run clean, as a replaced node would.
  (Not `TORCHELASTIC_RESTART_COUNT`: torchrun raises it only on the agent that lost the worker, and the
  ranks of the next round may sit on other nodes.)
"""

from __future__ import annotations

import logging
import os
import signal
import time

from polycom_lm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CRASH_ENVIRONMENT = "POLYCOM_LM_CRASH_AT"
FAULT_ENVIRONMENT = "POLYCOM_LM_FAULT"
_ACTIONS = ("sleep", "kill", "fail")
_first_step = None  # the first step this process trained (1: it started the run)


def crash_point(name: str) -> None:
    """SIGKILL this process here when `POLYCOM_LM_CRASH_AT` names this point (`NAME` or `NAME:STEP`;
    `name` is `POINT@STEP`)."""
    wanted = os.environ.get(CRASH_ENVIRONMENT)
    point, _, step = name.partition("@")
    if wanted and wanted in (point, f"{point}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def step_fault(rank: int, step: int) -> None:
    """Apply `POLYCOM_LM_FAULT` if it names this rank and step (see the module docstring)."""
    global _first_step
    wanted = os.environ.get(FAULT_ENVIRONMENT)
    if not wanted:
        return
    if _first_step is None:
        _first_step = step
    if _first_step != 1:
        return
    parts = wanted.split(":")
    try:
        action, fault_rank, fault_step = parts[0], int(parts[1]), int(parts[2])
        seconds = float(parts[3]) if len(parts) > 3 else 0.0
    except (IndexError, ValueError):
        raise ConfigError(f"{FAULT_ENVIRONMENT}={wanted!r} is invalid; use ACTION:RANK:STEP[:SECONDS] with "
                          f"ACTION one of {', '.join(_ACTIONS)}") from None
    if action not in _ACTIONS:
        raise ConfigError(f"{FAULT_ENVIRONMENT}: unknown action {action!r}; use one of {', '.join(_ACTIONS)}")
    if (fault_rank, fault_step) != (rank, step):
        return
    logger.warning("%s: %s at step %d on rank %d", FAULT_ENVIRONMENT, action, step, rank)
    if action == "sleep":
        time.sleep(seconds)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise DataError(f"{FAULT_ENVIRONMENT}: injected data failure at step {step}")
