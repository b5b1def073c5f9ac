"""The hang diagnosis in its cases, on hand-made progress snapshots (the real hang, with processes, is in
test_cluster_life.py), and the watchdog's claim of the abort key through a real TCPStore."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from polycom_lm.distributed.watchdog import EXIT_PEER_FAILED, Progress, Watchdog, diagnose

REPOSITORY = Path(__file__).resolve().parents[2]


def _snapshot(step: int, sequence: int, phase: str, age_s: float = 30.0, silent_for_s: float = 0.0) -> dict:
    return {"step": step, "sequence": sequence, "phase": phase, "age_s": age_s, "wall": time.time() - silent_for_s}


def test_the_rank_behind_is_named_with_its_phase_and_the_ones_waiting_with_theirs():
    waiting = _snapshot(3, 12, "token count all-reduce")
    line = diagnose(waiting, {0: waiting, 1: _snapshot(3, 11, "data"), 2: waiting, 3: waiting}, 20, stale_s=5)
    assert line.startswith("rank 1 did not arrive within distributed.timeout (20 s): rank 1 has been in 'data' of step 3 for 30 s")
    assert line.endswith("ranks 0, 2, 3 waited in 'token count all-reduce' of step 3")


def test_the_stalled_rank_itself_names_itself_the_same_way():
    behind = _snapshot(3, 11, "data")
    line = diagnose(behind, {0: _snapshot(3, 12, "token count all-reduce"), 1: behind}, 20, stale_s=5)
    assert line.startswith("rank 1 did not arrive") and line.endswith("rank 0 waited in 'token count all-reduce' of step 3")


def test_a_frozen_or_dead_rank_is_named_by_its_silence_and_one_that_never_started_too():
    waiting = _snapshot(7, 40, "gradient norm")
    line = diagnose(waiting, {0: waiting, 1: _snapshot(7, 40, "gradient norm", silent_for_s=60), 2: None}, 20, stale_s=5)
    assert line.startswith("ranks 1, 2 did not arrive")
    assert "rank 1 stopped responding 60 s ago, in 'gradient norm' of step 7" in line
    assert "rank 2 never reached the training loop" in line


def test_every_rank_in_one_phase_is_said_to_be_a_hang_inside_that_phase():
    same = _snapshot(2, 8, "forward")
    line = diagnose(same, {0: same, 1: same}, 20, stale_s=5)
    assert line.startswith("every rank has been in 'forward' of step 2 for more than distributed.timeout (20 s)")
    assert "a collective inside 'forward' waits" in line
    collective = _snapshot(2, 9, "loss all-reduce")
    assert "a communication hang" in diagnose(collective, {0: collective, 1: collective}, 20, stale_s=5)


def test_the_first_rank_to_report_claims_the_abort_and_the_others_read_it():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    first, second = (Watchdog(Progress(), 10.0, rank, 2, store=store) for rank in (0, 1))
    assert first.peer_abort() is None and second.peer_abort() is None
    first.progress.enter("data", step=5)
    first.report_failure("DataError: a shard is truncated")
    second.report_failure("RuntimeError: gloo connection closed")  # too late: the first report stands
    assert second.peer_abort() == "rank 0 failed in 'data' of step 5: DataError: a shard is truncated"
    assert first.peer_abort() is None  # its own report is not another rank's


def _master_store() -> tuple[dist.TCPStore, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)), port


def test_rank_0_hosting_the_store_waits_for_the_others_to_read_its_abort_before_it_exits():
    store, _ = _master_store()
    first, second = (Watchdog(Progress(), 10.0, rank, 2, store=store) for rank in (0, 1))
    threading.Timer(0.3, lambda: (second.peer_abort() is not None) and second.acknowledge()).start()
    start = time.monotonic()
    first.report_failure("DataError: a shard is truncated")
    waited = time.monotonic() - start
    assert 0.25 < waited < 2.0, waited  # until rank 1's acknowledgement, not the 3 s deadline
    start = time.monotonic()
    Watchdog(Progress(), 10.0, 0, 2, store=dist.PrefixStore("other", store)).report_failure("nobody reads this")
    assert 2.5 < time.monotonic() - start < 4.5  # nobody acknowledged: two intervals and a second, then go


CHILD = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from polycom_lm.distributed import watchdog
watchdog.STORE_LOST_MIN_S = 1.0
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False, timeout=timedelta(seconds=5))
watchdog.Watchdog(watchdog.Progress(), 5.0, 1, 2, store=store).start()
print("started", flush=True)
time.sleep(60)  # a main thread blocked outside any collective (a stalled data loader)
"""


def test_a_rank_blocked_outside_a_collective_exits_once_the_store_is_gone_for_the_timeout():
    store, port = _master_store()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPOSITORY, env=dict(os.environ, PYTHONPATH=str(REPOSITORY)))
    assert child.stdout.readline().strip() == "started"
    while not store.check(["polycom_lm/watchdog/test//rank/1"]):
        time.sleep(0.05)
    del store  # the store's host (rank 0's process) is gone
    gone = time.monotonic()
    assert child.wait(timeout=30) == EXIT_PEER_FAILED, child.stderr.read()[-3000:]
    assert 4.0 < time.monotonic() - gone < 12.0  # the 5 s timeout after the first failed call, not the 60 s stall
    assert "the job's key-value store has not answered" in child.stderr.read()
