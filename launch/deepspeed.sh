#!/usr/bin/env bash
# The DeepSpeed launcher: `launch/deepspeed.sh CONFIG [key=value ...]` (the config selects
# `distributed.backend: deepspeed`; arguments reach `polycom-lm train` unchanged).
# Multi-node: HOSTFILE=path (DeepSpeed's "host slots=N" format) and MASTER_ADDR / MASTER_PORT.
# Environment: NPROC_PER_NODE (default: GPUs on the node), HOSTFILE, MASTER_ADDR, MASTER_PORT, PYTHON,
# DRY_RUN=1. TORCH_EXTENSIONS_DIR defaults to the repository's .cache/torch_extensions (compiled ops).
set -euo pipefail
LAUNCHER_HELP="environment: NPROC_PER_NODE, HOSTFILE, MASTER_ADDR, MASTER_PORT, PYTHON, DRY_RUN=1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage_if_no_config "$@"
repository="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repository/.cache/torch_extensions}"
launcher=("$PYTHON" -m deepspeed.launcher.runner)
if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR with HOSTFILE}" --master_port "${MASTER_PORT:-29500}")
else
    launcher+=(--num_gpus "$(detect_nproc_per_node)" --master_port "${MASTER_PORT:-29500}")
fi
# --no_local_rank: our CLI reads LOCAL_RANK from the environment instead of a --local_rank argument.
run_printed "${launcher[@]}" --no_local_rank --module polycom_lm.cli train "$@"
