#!/usr/bin/env bash
# Several nodes, c10d rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=4 launch/torchrun_multi_node.sh CONFIG [key=value ...]
# Environment: MASTER_ADDR (required: a host every node reaches), MASTER_PORT (29500), NNODES (required),
# NPROC_PER_NODE (default: GPUs on the node), RDZV_ID (default: polycom_lm), PYTHON, DRY_RUN=1.
set -euo pipefail
LAUNCHER_HELP="environment: MASTER_ADDR and NNODES (required), MASTER_PORT, NPROC_PER_NODE, RDZV_ID, PYTHON, DRY_RUN=1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage_if_no_config "$@"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. the first node)}"
: "${NNODES:?set NNODES to the number of nodes}"
nproc=$(detect_nproc_per_node)
run_printed "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-polycom_lm}" \
    -m polycom_lm.cli train "$@"
