"""A hang ends in one line: every rank's progress in the job's key-value store, read when a rank waits too long.

The trainer marks each phase of a step on its `Progress` (an attribute write, no I/O). A `Watchdog`
thread per rank publishes that progress to the c10d store of the default process group every
`interval_s` (a tenth of `distributed.timeout_*`, between 0.2 and 10 s) and watches two things:

- Its own rank has been in one phase for longer than the timeout. It reads every rank's progress and
  names the ranks that are behind (an earlier step or phase), or that stopped publishing (a frozen or
  dead process): "rank 1 did not arrive: rank 1 has been in 'data' of step 3 for 21 s (...)". The
  first rank to decide claims the store's abort key with that line and prints it (`error: ...` on
  stderr, as the CLI does); every rank then exits with `EXIT_HANG`. When every rank is in the same phase
  (a collective inside the forward pass, as DDP's and FSDP's, waits for a rank still computing there),
  the line says so: the phases cannot tell them apart. A phase that long would hit the backend's own
  timeout as well, so it ends the run either way.
- The store stopped answering for longer than the timeout (its host, rank 0's process or torchrun's
  agent, has gone: the job has ended). This rank exits with `EXIT_PEER_FAILED`.
- Another rank claimed the abort key (a hang, or a failure: `report_failure`, called by the trainer when
  a step raises on this rank). This rank then exits with `EXIT_PEER_FAILED`, printing nothing: the rank
  that failed speaks for the run. Only a rank blocked in a collective gets here; one whose collective
  failed first stops through the trainer (`PeerStopped`, which the CLI does not print).

The backend's own timeout is set later than this one (`mesh.backstop_timeout_s`), so a gloo timeout's
traceback or NCCL's watchdog abort (`mesh.NCCL_ENVIRONMENT`) is only the backstop. Exiting from the thread
is `os._exit`: the main thread is inside a collective that cannot be interrupted. Nothing is lost by it:
checkpoints are written atomically (`checkpoint/folders.py`) and the run lock is released by the kernel.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from polycom_lm.errors import PolycomError

logger = logging.getLogger(__name__)

EXIT_HANG = 3  # a collective waited longer than distributed.timeout_*
EXIT_PEER_FAILED = 4  # another rank failed or hung; it printed why

ABORT_KEY = "abort"
STORE_LOST_MIN_S = 10.0  # see Watchdog._check_store_lost
# Phases in which a rank only waits for the others: all ranks there together past the timeout is a hang.
COLLECTIVE_PHASES = frozenset({"token count all-reduce", "loss all-reduce", "gradient norm", "stop decision",
                               "checkpoint barrier"})


class PeerStopped(PolycomError):
    """This rank stopped because another rank failed or hung. That rank printed the reason (one line per
    run), so the CLI prints nothing for this one; the message is for callers in Python."""

    exit_status = EXIT_PEER_FAILED

    def __init__(self, message: str, printed_elsewhere: bool = True):
        super().__init__(message)
        self.printed_elsewhere = printed_elsewhere


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because a peer went away (gloo's and NCCL's errors)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error).lower())


@dataclass
class Progress:
    """What this rank is doing: step, phase and a sequence number that grows with every phase of the run
    (so that ranks compare by how far they got, whatever the phases are called)."""

    step: int = 0
    phase: str = "start-up"
    sequence: int = 0
    since: float = field(default_factory=time.monotonic)

    def enter(self, phase: str, step: Optional[int] = None) -> None:
        if step is not None:
            self.step = step
        self.phase = phase
        self.sequence += 1
        self.since = time.monotonic()

    def snapshot(self) -> dict:
        return {"step": self.step, "phase": self.phase, "sequence": self.sequence,
                "age_s": round(time.monotonic() - self.since, 3), "wall": time.time()}


def describe(snapshot: dict) -> str:
    return f"'{snapshot['phase']}' of step {snapshot['step']}"


def diagnose(mine: dict, others: dict[int, Optional[dict]], timeout_s: float, stale_s: float) -> str:
    """The one line for a rank that has been in its phase (`mine`) past the timeout. `others`: every rank's
    last published snapshot (None when it never published), this one's included."""
    now = time.time()
    silent = sorted(r for r, s in others.items() if s is None or now - s["wall"] > stale_s)
    live = {r: s for r, s in others.items() if r not in silent}
    position = lambda s: (s["step"], s["sequence"])  # noqa: E731
    furthest = max(live.values(), key=position, default=mine)
    behind = sorted(r for r, s in live.items() if position(s) < position(furthest))
    missing = sorted(set(silent) | set(behind))
    if not missing:
        where = ("a communication hang: check the network" if mine["phase"] in COLLECTIVE_PHASES
                 else f"no rank is behind the others, so a collective inside '{mine['phase']}' waits")
        return (f"every rank has been in {describe(mine)} for more than distributed.timeout ({timeout_s:g} s): "
                f"{where}; raise distributed.timeout_minutes if this phase is legitimately that long")
    parts = []
    for r in missing:
        snapshot = others.get(r)
        if snapshot is None:
            parts.append(f"rank {r} never reached the training loop")
        elif r in silent:
            parts.append(f"rank {r} stopped responding {now - snapshot['wall']:.0f} s ago, in {describe(snapshot)}")
        else:
            parts.append(f"rank {r} has been in {describe(snapshot)} for {snapshot['age_s'] + now - snapshot['wall']:.0f} s")
    waiting = sorted(r for r in others if r not in missing)
    plural = "s" if len(missing) > 1 else ""
    return (f"rank{plural} {_ranges(missing)} did not arrive within distributed.timeout ({timeout_s:g} s): "
            f"{'; '.join(parts)}; rank{'s' if len(waiting) != 1 else ''} {_ranges(waiting)} waited in {describe(furthest)}")


def _ranges(ranks: list[int]) -> str:
    if len(ranks) > 8:
        return f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
    return ", ".join(str(r) for r in ranks) or "none"


def attempt_token() -> str:
    """A name for this attempt of the job that every rank agrees on: rank 0's random token, broadcast.

    Not `TORCHELASTIC_RESTART_COUNT`: torchrun counts only the restarts an agent caused itself, so after a
    lost worker the agent that lost it says 1 and the agents that restarted for the new rendezvous round
    say 0. And the store may outlive an attempt (torchrun's shared rendezvous store, when
    `TORCH_DISABLE_SHARE_RDZV_TCP_STORE` is not 1), so the keys need a name of their own."""
    token = [uuid.uuid4().hex[:16] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return str(token[0])


class Watchdog:
    """See the module docstring. `start()` after the process group exists; `close()` when training ends."""

    def __init__(self, progress: Progress, timeout_s: float, rank: int, world_size: int,
                 store: Optional[dist.Store] = None, stop_requests=None, stop_grace_s: float = 60.0):
        self.progress = progress
        # After a stop signal: exit when stuck this long outside a checkpoint (see _check_stop_grace).
        self.stop_requests = stop_requests
        self.stop_grace_s = stop_grace_s
        self.timeout_s = timeout_s
        self.rank = rank
        self.world_size = world_size
        self.interval_s = max(min(timeout_s / 10.0, stop_grace_s / 4.0, 10.0), 0.2)
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        # Keys of this attempt only: a group that torchrun restarted must not read the abort of the one before.
        self.store = dist.PrefixStore(f"polycom_lm/watchdog/{attempt_token() if store is None else 'test'}/", base)
        # When a store call first failed: the store does not come back (its host is gone), and every further
        # call would print another C++ warning with its stack, so none is made.
        self.lost_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polycom-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1)

    # -- what the trainer calls
    def report_failure(self, message: str) -> None:
        """This rank failed: tell the others (they stop instead of waiting for the timeout)."""
        line = f"rank {self.rank} failed in {describe(self.progress.snapshot())}: {message}"
        # The store may be gone with the job; the failure itself is what matters.
        if self._reach(lambda: self.store.compare_set(ABORT_KEY, "", json.dumps({"rank": self.rank, "line": line}))):
            self._await_acknowledgements()

    def peer_abort(self) -> Optional[str]:
        """The line another rank left in the abort key, or None."""
        claimed = self._reach(lambda: json.loads(self.store.get(ABORT_KEY)) if self.store.check([ABORT_KEY]) else None)
        return claimed["line"] if claimed is not None and claimed.get("rank") != self.rank else None

    def _reach(self, call, default=None):
        """`call()` on the store, or `default` once the store is lost: its first failure marks it lost (see
        `lost_at`), and no further call is made."""
        if self.lost_at is not None:
            return default
        try:
            return call()
        except Exception:  # noqa: BLE001  the store went away (its host, rank 0 or torchrun's agent, is gone)
            logger.debug("watchdog: the store did not answer", exc_info=True)
            self._lose()
            return default

    # -- the thread
    def _publish(self) -> None:
        self.store.set(f"rank/{self.rank}", json.dumps(self.progress.snapshot()))

    def acknowledge(self) -> None:
        """This rank saw another rank's abort and is exiting (what rank 0 waits for before it exits)."""
        self._reach(lambda: self.store.set(f"ack/{self.rank}", "1"))

    def _await_acknowledgements(self) -> None:
        """On rank 0, whose process hosts the workers' store: wait (at most two intervals) for the other
        ranks to read the abort before this process exits and the store with it. A rank blocked outside a
        collective (a stalled loader) then exits at once, silently, instead of when the store's loss counts."""
        if self.rank != 0:
            return
        deadline = time.monotonic() + 2 * self.interval_s + 1.0
        keys = [f"ack/{r}" for r in range(1, self.world_size)]
        while not self._reach(lambda: self.store.check(keys), default=True) and time.monotonic() < deadline:
            time.sleep(min(self.interval_s / 2, 0.5))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._check_stop_grace()
            if self.lost_at is not None:
                self._check_store_lost(time.monotonic() - self.lost_at)
                continue
            try:
                self._publish()
                if self.peer_abort() is not None:
                    self.acknowledge()
                    os._exit(EXIT_PEER_FAILED)
                if time.monotonic() - self.progress.since > self.timeout_s:
                    self._check_hang()
            except Exception:  # noqa: BLE001  the store went away (its host, rank 0 or torchrun's agent, is gone)
                if self._stop.is_set():
                    return
                logger.debug("watchdog: store not reachable", exc_info=True)
                self._lose()

    def _lose(self) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()

    def _check_store_lost(self, lost_s: float) -> None:
        """The job's store has not answered for `lost_s`: the process hosting it ended, so the job has (a
        rank's failure or hang printed why). A rank whose main thread is blocked outside a collective (a
        stalled data loader) would otherwise wait as long as that lasts: exit after the timeout (at least
        `STORE_LOST_MIN_S`, so that ranks finishing a run a moment after rank 0 are not cut short)."""
        if lost_s > max(self.timeout_s, STORE_LOST_MIN_S):
            logger.error("the job's key-value store has not answered for %.0f s, in %s: the job has ended (the "
                         "rank that failed said why); exiting", lost_s, describe(self.progress.snapshot()))
            os._exit(EXIT_PEER_FAILED)

    def _check_stop_grace(self) -> None:
        """A stop signal arrived and this rank has not moved since for `stop_grace_s` (outside a checkpoint,
        which may take long): its peers are gone (torchrun stops every worker with SIGTERM to restart the
        group after one died), so finishing the step would wait for them; exit now. The last complete
        checkpoint stands."""
        stop = self.stop_requests
        if stop is None or stop.received is None or self.progress.phase == "checkpoint":
            return
        stuck_s = time.monotonic() - max(stop.received_at, self.progress.since)
        if stuck_s > self.stop_grace_s:
            logger.warning("no progress for %.0f s since the stop signal, in %s: the other ranks are gone; exiting "
                           "without a new checkpoint (the last complete one stands)", stuck_s, describe(self.progress.snapshot()))
            os._exit(128 + stop.received)

    def _check_hang(self) -> None:
        mine = self.progress.snapshot()
        others: dict[int, Optional[dict]] = {}
        for r in range(self.world_size):
            key = f"rank/{r}"
            others[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        others[self.rank] = mine
        line = diagnose(mine, others, self.timeout_s, stale_s=3 * self.interval_s + 2.0)
        claim = json.dumps({"rank": self.rank, "line": line})
        if self.store.compare_set(ABORT_KEY, "", claim).decode() == claim:
            os.write(2, f"error: {line}\n".encode())
            logger.error("%s", line)
            self._await_acknowledgements()
            os._exit(EXIT_HANG)
        self.acknowledge()
        os._exit(EXIT_PEER_FAILED)
