#!/usr/bin/env bash
# Several nodes, c10d rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=4 launch/torchrun_multi_node.sh CONFIG [key=value ...]
# Environment: MASTER_ADDR (required: a host every node reaches), MASTER_PORT (29500), NNODES (required),
# NODE_RANK (optional: c10d assigns node ranks by arrival; set it to pin them), NPROC_PER_NODE (default:
# GPUs on the node), RDZV_ID (default: polycom_lm), MAX_RESTARTS (3), SHUTDOWN_TIMEOUT (300), PYTHON,
# DRY_RUN=1. A worker that dies restarts the group on every node (from `latest`); a SIGTERM / SIGUSR1 to
# torchrun makes every worker save a checkpoint and stop (see launch/common.sh).
set -euo pipefail
LAUNCHER_HELP="environment: MASTER_ADDR and NNODES (required), MASTER_PORT, NODE_RANK, NPROC_PER_NODE, RDZV_ID, MAX_RESTARTS, SHUTDOWN_TIMEOUT, PYTHON, DRY_RUN=1"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage_if_no_config "$@"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. the first node)}"
: "${NNODES:?set NNODES to the number of nodes}"
nproc=$(detect_nproc_per_node)
torchrun_lifecycle_arguments
node_rank=()
if [ -n "${NODE_RANK:-}" ]; then node_rank=(--node-rank="$NODE_RANK"); fi
run_printed "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" "${node_rank[@]}" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-polycom_lm}" \
    "${TORCHRUN_LIFECYCLE[@]}" -m polycom_lm.cli train "$@"
