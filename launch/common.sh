# Shared by the launchers (sourced, not run). Picks the Python, counts the GPUs, prints and runs commands.

# The project's venv when there is one, else `python` on PATH; override with PYTHON=...
if [ -z "${PYTHON:-}" ]; then
    repository="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [ -x "$repository/.venv/bin/python" ]; then PYTHON="$repository/.venv/bin/python"; else PYTHON=python; fi
fi

# GPUs on this node (NPROC_PER_NODE overrides; 1 process when there is no GPU).
detect_nproc_per_node() {
    if [ -n "${NPROC_PER_NODE:-}" ]; then echo "$NPROC_PER_NODE"; return; fi
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
    if [ "$count" -gt 0 ]; then echo "$count"; else echo 1; fi
}

# Print the exact command (shell-quoted, so it can be pasted back), then run it unless DRY_RUN=1.
run_printed() {
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    exec "$@"
}

usage_if_no_config() {
    if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
        echo "usage: $(basename "$0") CONFIG [key=value ...] [train options]" >&2
        echo "$LAUNCHER_HELP" >&2
        exit 2
    fi
}

# Cluster life, shared by the torchrun launchers:
# - MAX_RESTARTS (default 3): torchrun restarts the whole group this many times when a worker dies (a lost
#   node, an OOM kill); the new workers resume from `latest` by themselves.
# - the stop signals reach the workers: torchrun forwards SIGTERM and also SIGUSR1/SIGUSR2 (SLURM's
#   `--signal=B:USR1@seconds`), then waits SHUTDOWN_TIMEOUT seconds (default 300) for the checkpoint the
#   workers write before it kills them (torch >= the release whose torchrun has --signals-to-handle).
# - POLYCOM_LM_START_TIME: the launch's start, from which `training.time_limit` counts, the same for
#   workers torchrun restarts.
# - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each attempt's workers get a fresh key-value store (hosted by rank
#   0). torchrun otherwise shares its rendezvous store with the workers for the whole job, and after a
#   restart the new process group read the dead workers' addresses from it ("Gloo connectFullMesh failed
#   ... Connection refused", or a hang): the restart after a lost worker failed or hung about one time in three.
export POLYCOM_LM_START_TIME="${POLYCOM_LM_START_TIME:-$(date +%s)}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
torchrun_lifecycle_arguments() {
    TORCHRUN_LIFECYCLE=(--max-restarts="${MAX_RESTARTS:-3}")
    local run_py
    # Where torchrun's source is, read from the package metadata (no `import torch`: that takes seconds).
    run_py=$("$PYTHON" -c "import importlib.metadata as m; print(m.distribution('torch').locate_file('torch/distributed/run.py'))" 2>/dev/null || true)
    if [ -n "$run_py" ] && grep -q -- '--signals-to-handle' "$run_py" 2>/dev/null; then
        TORCHRUN_LIFECYCLE+=(--signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2")
        TORCHRUN_LIFECYCLE+=(--shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}")
    fi
}

# Run a command in the background and forward USR1 / USR2 / TERM to it; when one arrived, requeue the SLURM
# job once the command has stopped (REQUEUE=0 turns that off). Exits with the command's status.
run_until_signalled() {
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    local stop_signal="" status=0 name
    "$@" &
    local child=$!
    for name in USR1 USR2 TERM; do
        # shellcheck disable=SC2064  (the signal's name is fixed now, on purpose)
        trap "stop_signal=$name; echo \"$(basename "$0"): received SIG$name: asking the workers to save and stop\" >&2; kill -s $name $child 2>/dev/null || true" "$name"
    done
    while true; do
        status=0
        wait "$child" || status=$?
        kill -0 "$child" 2>/dev/null || break  # `wait` also returns when a trapped signal arrives
    done
    trap - USR1 USR2 TERM
    if [ -n "$stop_signal" ] && [ "${REQUEUE:-1}" != "0" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        local job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"
        job="${job:-$SLURM_JOB_ID}"
        echo "$(basename "$0"): stopped by SIG$stop_signal (exit status $status); requeueing job $job" >&2
        scontrol requeue "$job"
    fi
    return "$status"
}
