#!/usr/bin/env bash
# One node, one process per GPU: `launch/torchrun_single_node.sh CONFIG [key=value ...]`.
# Everything after the launcher name goes to `polycom-lm train` unchanged.
# Environment: NPROC_PER_NODE (default: GPUs on the node, 1 without GPUs), MAX_RESTARTS (3),
# SHUTDOWN_TIMEOUT (300), PYTHON, DRY_RUN=1 (print only). Restarts and stop signals: launch/common.sh.
set -euo pipefail
LAUNCHER_HELP="environment: NPROC_PER_NODE (default: number of GPUs), MAX_RESTARTS, SHUTDOWN_TIMEOUT, PYTHON, DRY_RUN=1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage_if_no_config "$@"
nproc=$(detect_nproc_per_node)
torchrun_lifecycle_arguments
run_printed "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$nproc" \
    "${TORCHRUN_LIFECYCLE[@]}" -m polycom_lm.cli train "$@"
