#!/usr/bin/env bash
# The test command: sets up .venv if needed (with the dev extras: pytest, DeepSpeed, Triton, TensorBoard),
# then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
# DeepSpeed compiles a small C++ op on first use; keep its cache inside the (ignored) project cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest "$@"
