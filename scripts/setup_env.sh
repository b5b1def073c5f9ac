#!/usr/bin/env bash
# Creates .venv (if missing) and installs what the project needs: torch==2.13.0 first (explicitly, so
# that no other package pulls a different build), then the project.
#   bash scripts/setup_env.sh         the project with its dev extras (tests, DeepSpeed, Triton, TensorBoard):
#                                      what scripts/test.sh and contributors use
#   bash scripts/setup_env.sh train   the project alone: all that training on one machine needs (quickstart)
# Idempotent: a second run only checks that everything is already there (a dev install covers train).
set -euo pipefail
cd "$(dirname "$0")/.."
level="${1:-dev}"
case "$level" in
    dev) target=".[dev]" ;;
    train) target="." ;;
    *) echo "usage: $0 [dev|train]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.polycom_lm_installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ]; then
    read -r have_hash have_level < "$stamp" || true
    if [ "$have_hash" = "$want" ] && { [ "$have_level" = "$level" ] || [ "$have_level" = "dev" ]; }; then
        exit 0
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
echo "setup: installing torch==2.13.0" >&2
.venv/bin/python -m pip install -q "torch==2.13.0" >&2
echo "setup: installing polycom_lm$( [ "$level" = dev ] && echo '[dev]')" >&2
.venv/bin/python -m pip install -q -e "$target" >&2
echo "$want $level" > "$stamp"
