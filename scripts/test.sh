#!/usr/bin/env bash
# The test command: sets up .venv if needed (with the dev extras: pytest, pytest-xdist, DeepSpeed, Triton,
# TensorBoard), then runs the whole suite. Extra arguments go to pytest.
#
# The test files are spread over pytest-xdist workers, one file per worker at a time (`--dist loadfile`:
# a file's module-scoped fixtures, e.g. one torchrun launch for many tests, run once): as many workers as
# cores, at most 4. Much of the suite waits on subprocesses (interpreter start-up, rendezvous, signals),
# so two workers on two cores cut its time by about a quarter. In-process tests use two OpenMP threads
# (measured on 2 cores: 522 s for the suite, against 648 s with one, as the workers often wait); the
# multi-process tests give each rank one. TEST_WORKERS=0 runs everything in this one process (e.g. pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
# DeepSpeed compiles C++ ops on first use; keep its cache inside the (ignored) project cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
cores=$(nproc)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$workers" -gt 1 ]; then
    exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
