#!/usr/bin/env bash
# Checks the lower bounds in pyproject.toml: installs every direct dependency at exactly its declared floor
# (pip resolves the rest as it would for a user) into a throwaway venv, then runs the tests that exercise
# them (config, data, tokenizers, hub ids, streaming, the transformers conversions, wandb, the scipy fits). torch is the
# exception: it is pinned by the setup scripts (torch==2.13.0), so its floor is not tested here.
#   bash scripts/check_dependency_floors.sh [pytest arguments]     (downloads the old versions: minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work="$(mktemp -d "${TMPDIR:-/tmp}/polycom_floors.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PYTHON" - > "$work/floors.txt" <<'EOF'
import re, tomllib
for requirement in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement.split("#")[0].strip())
    if match is None:
        raise SystemExit(f"cannot read a floor from {requirement!r}")
    if match.group(1) != "torch":
        print(f"{match.group(1)}=={match.group(2)}")
EOF
echo "floors: $(tr '\n' ' ' < "$work/floors.txt")" >&2
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip >&2
"$work/venv/bin/python" -m pip install -q "torch==2.13.0" >&2
"$work/venv/bin/python" -m pip install -q --constraint "$work/floors.txt" -e . "pytest>=8" "psutil" >&2
"$work/venv/bin/python" -m pip check >&2
"$work/venv/bin/python" -m pip freeze | grep -iE "^($(cut -d= -f1 "$work/floors.txt" | paste -sd'|'))==" >&2
export WANDB_MODE="${WANDB_MODE:-disabled}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_override_syntax.py \
    tests/test_dependency_floors.py tests/data tests/models/test_hf_olmoe.py tests/models/test_hf_llama_interop.py \
    tests/models/test_moe_layer.py tests/train/test_wandb_precedence.py tests/study/test_ladder_fits.py "$@"
