#!/usr/bin/env bash
# One node, one process per GPU: `launch/torchrun_single_node.sh CONFIG [key=value ...]`.
# Everything after the launcher name goes to `polycom-lm train` unchanged.
# Environment: NPROC_PER_NODE (default: GPUs on the node, 1 without GPUs), PYTHON, DRY_RUN=1 (print only).
set -euo pipefail
LAUNCHER_HELP="environment: NPROC_PER_NODE (default: number of GPUs), PYTHON, DRY_RUN=1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage_if_no_config "$@"
nproc=$(detect_nproc_per_node)
run_printed "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$nproc" \
    -m polycom_lm.cli train "$@"
