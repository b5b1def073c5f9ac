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
