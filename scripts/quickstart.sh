#!/usr/bin/env bash
# Quickstart: create or refresh .venv (scripts/setup_env.sh train: torch==2.13.0 first, then the project
# without the dev extras: no DeepSpeed, Triton or TensorBoard, which one machine does not need), then
# train the small model with PolyNorm on the built-in corpus for a few minutes on CPU, evaluating the
# validation loss, and print where the metrics and checkpoints are. Extra arguments are config overrides,
# e.g. `bash scripts/quickstart.sh training.max_steps=20`. Running it again resumes / reports the same run;
# add --overwrite to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh train
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec .venv/bin/polycom-lm train configs/experiments/quickstart/polynorm.yaml "$@"
