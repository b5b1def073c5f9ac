"""The hang diagnosis in its cases, on hand-made progress snapshots (the real hang, with processes, is in
test_cluster_life.py), and the watchdog's claim of the abort key through a real TCPStore."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import torch.distributed as dist

from polycom_lm.distributed.watchdog import Progress, Watchdog, diagnose


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
