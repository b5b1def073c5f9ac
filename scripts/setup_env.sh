#!/usr/bin/env bash
# Creates .venv (if missing) and installs what the project needs: torch==2.13.0 first (explicitly, so
# that no other package pulls a different build), then the project with its dev extras. Idempotent:
# a second run only checks that everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.polycom_lm_installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
echo "setup: installing torch==2.13.0" >&2
.venv/bin/python -m pip install -q "torch==2.13.0" >&2
echo "setup: installing polycom_lm[dev]" >&2
.venv/bin/python -m pip install -q -e ".[dev]" >&2
echo "$want" > "$stamp"
