"""The Triton PolyCom kernels (forward, backward, tensor-parallel variant) against the plain-autograd
reference, on CPU through Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = Path(__file__).with_name("triton_interpreter_checks.py")


def test_triton_kernels_match_reference_under_interpreter():
    environment = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(CHECKS)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton kernels match the reference" in result.stdout
