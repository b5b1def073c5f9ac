"""Fixtures of the study tests."""

from __future__ import annotations

import pytest

from polycom_lm.study import runner
from study_helpers import spawn_in_process


@pytest.fixture
def runner_trains_in_process(monkeypatch) -> list:
    """The runner's training runs in this process for the whole test; returns the configs launched."""
    launched: list = []
    monkeypatch.setattr(runner, "_spawn", spawn_in_process(launched))
    return launched
