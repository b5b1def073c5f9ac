"""Stopping before the last step on purpose: preemption signals and a wall-clock budget.

A scheduler that preempts a job or reaches its time limit sends a signal first (SLURM: SIGTERM, then
SIGKILL after its KillWait; `--signal=B:USR1@seconds` some minutes before the end, which `launch/`
forwards to every worker). Any signal of `training.stop_signals`, on any rank, sets a flag; after every
step all ranks reduce their flags over the whole world (one small all-reduce), so every rank stops after
the same step, writes one checkpoint and exits. A second signal while that checkpoint is written is
logged and otherwise ignored: the save is never cut short by its own trigger.

`training.time_limit` ("3h50m", "90m", "45s", "03:50:00") is the budget of one launch, counted from
`POLYCOM_LM_START_TIME` (seconds since the epoch; the launchers export it once, so workers that torchrun
restarts keep the same deadline) or else from the start of this process. The run stops when what is
left is less than the longest step interval plus the longest save measured so far (before the first
save, the longest step interval stands in for it).

Exit status (`polycom-lm train`): 0 when training ended or stopped at its time limit; 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1) when a signal stopped it after a complete checkpoint. Either
way, running the same command again continues from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from polycom_lm.errors import ConfigError

logger = logging.getLogger(__name__)

START_TIME_ENVIRONMENT = "POLYCOM_LM_START_TIME"
_UNHANDLEABLE = {"SIGKILL", "SIGSTOP"}
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
_TIME_LIMIT_CODE = 1  # the reduced flag: 0 no stop, 1 time limit, 1 + signal number for a signal


def parse_duration(text: str, key: str) -> float:
    """Seconds in `text`: "3h50m", "1d2h", "90m", "45s", "2.5h", "03:50:00" (SLURM's H:M:S) or a number of
    seconds; a one-line ConfigError naming `key` otherwise."""
    value = str(text).strip().lower()
    seconds: Optional[float] = None
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"\d+(?::\d{1,2}){1,2}", value):
        parts = [int(part) for part in value.split(":")]
        seconds = float(sum(part * 60**power for power, part in enumerate(reversed(parts))))
    elif value and (match := _DURATION.match(value)):
        days, hours, minutes, secs = (float(group) if group else 0.0 for group in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds is None or seconds <= 0:
        raise ConfigError(f"{key}={text!r} is invalid; give a positive duration such as 3h50m, 90m, 45s or 03:50:00")
    return seconds


def signal_numbers(names: list[str], key: str = "training.stop_signals") -> list[int]:
    """The signals named (SIGTERM, TERM, USR1, ...); a one-line ConfigError for unknown or unhandleable ones."""
    numbers = []
    for name in names:
        canonical = str(name).strip().upper()
        canonical = canonical if canonical.startswith("SIG") else f"SIG{canonical}"
        number = getattr(signal.Signals, canonical, None) if canonical not in _UNHANDLEABLE else None
        if number is None:
            raise ConfigError(f"{key}: {name!r} is not a signal a process can handle; use names such as SIGTERM, "
                              f"SIGUSR1, SIGUSR2, SIGINT (SIGKILL and SIGSTOP cannot be caught)")
        numbers.append(int(number))
    return numbers


@dataclass(frozen=True)
class StopReason:
    """Why training stopped before `training.max_steps`, with the exit status the CLI returns."""

    signal_number: Optional[int]  # None: the time limit
    step: int

    @property
    def exit_status(self) -> int:
        return 0 if self.signal_number is None else 128 + self.signal_number

    def describe(self) -> str:
        if self.signal_number is None:
            return "training.time_limit"
        return signal.Signals(self.signal_number).name


class StopRequests:
    """The signal flag and time budget of one run, and the decision every rank takes together."""

    def __init__(self, signals: list[str], time_limit: Optional[str], now: Callable[[], float] = time.time):
        self.signals = signal_numbers(signals)
        self.time_limit_s = parse_duration(time_limit, "training.time_limit") if time_limit else None
        self._now = now
        started = os.environ.get(START_TIME_ENVIRONMENT)
        try:
            self.start_time = float(started) if started else now()
        except ValueError:
            raise ConfigError(f"{START_TIME_ENVIRONMENT}={started!r} is not a number of seconds since the epoch") from None
        self.received: Optional[int] = None
        self.received_at = 0.0  # time.monotonic() of the first signal
        self.saving = False
        self.longest_interval_s = 0.0
        self.longest_save_s = 0.0
        self._last_check = time.monotonic()
        self._previous: dict[int, object] = {}

    def start(self) -> None:
        """Training starts now: the first step interval is measured from here."""
        self._last_check = time.monotonic()

    # -- signals
    def install(self) -> None:
        """Catch the stop signals (main thread only; elsewhere Python cannot install handlers)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = number
            self.received_at = time.monotonic()
            logger.warning("received %s: finishing this step, then saving a checkpoint and stopping", name)
        elif self.saving:
            logger.warning("received %s again while the checkpoint is being written; the save goes on", name)
        else:
            logger.warning("received %s again; already stopping after this step", name)

    # -- time budget
    def record_save(self, seconds: float) -> None:
        self.longest_save_s = max(self.longest_save_s, seconds)

    def _out_of_time(self) -> bool:
        now = time.monotonic()
        self.longest_interval_s = max(self.longest_interval_s, now - self._last_check)
        self._last_check = now
        if self.time_limit_s is None:
            return False
        save = self.longest_save_s or self.longest_interval_s
        left = self.time_limit_s - (self._now() - self.start_time)
        return left < self.longest_interval_s + save

    # -- the decision
    def local_flag(self) -> int:
        """This rank's request: 0 none, 1 the time limit, 1 + signal number for a signal (which wins)."""
        out_of_time = self._out_of_time()
        if self.received is not None:
            return _TIME_LIMIT_CODE + self.received
        return _TIME_LIMIT_CODE if out_of_time else 0

    def decide(self, step: int, reduce_max: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Optional[StopReason]:
        """Whether every rank stops after `step`: each rank's flag, reduced with `reduce_max` (the world's
        all-reduce MAX, identity on one process), so that all ranks take the same decision."""
        flag = int(reduce_max(torch.tensor([self.local_flag()], dtype=torch.int64, device=device)).item())
        if flag == 0:
            return None
        return StopReason(None if flag == _TIME_LIMIT_CODE else flag - _TIME_LIMIT_CODE, step)
