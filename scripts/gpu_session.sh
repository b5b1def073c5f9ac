#!/usr/bin/env bash
# A GPU session's measurements in one prepared command (GPU time comes in short windows):
#
#   PYTHONPATH=. bash scripts/gpu_session.sh OUT_DIR [bench] [commands]     # both stages by default
#   SMOKE=1 bash scripts/gpu_session.sh /tmp/gpu_smoke                       # tiny and on CPU: checks the script
#
# bench     scripts/bench_gpu.py --json OUT_DIR/gpu.json (about 8 minutes on one H200).
# commands  the real commands, as a user runs them, on the quickstart configs in bf16 (about 3 minutes):
#           `train` dense PolyNorm and a small MoE, `torchrun --nproc-per-node=1` with the fsdp engine
#           (NCCL), a resume of the dense run for 20 more steps, `eval` on local task files carried in
#           .gpu_eval/ (copy them there first: see below), `export` and loading the export with transformers.
#           OUT_DIR/commands.json gets each run's final loss, tokens/s and MFU; OUT_DIR/commands.log all output.
#
# The device machine has no datasets, wandb or DeepSpeed: every run here has wandb disabled and reads the
# built-in corpus. The eval data does not travel by itself (../shared is not sent); before the session:
#   mkdir -p .gpu_eval && cp -r ../shared/data/eval/piqa ../shared/data/eval/arc .gpu_eval/
#   echo /.gpu_eval/ >> .git/info/exclude      # and name .gpu_eval in the device call's carry
set -uo pipefail

OUT_DIR=${1:?usage: gpu_session.sh OUT_DIR [bench] [commands]}
shift
STAGES=${*:-bench commands}
SMOKE=${SMOKE:-0}
PYTHON=${PYTHON:-python3}
EVAL_DIR=${EVAL_DIR:-.gpu_eval}   # task files in the layout of shared/data/eval
# More overrides for every run, e.g. another corpus (the CPU test gives its small prepared one, so that it
# does not tokenise the built-in corpus first): words split on whitespace.
read -r -a EXTRA <<< "${EXTRA_OVERRIDES:-}"
export PYTHONPATH=${PYTHONPATH:-.}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
mkdir -p "$OUT_DIR"
RUNS=$OUT_DIR/runs
LOG=$OUT_DIR/commands.log
status=0

step() {  # step NAME COMMAND...: run, log, and remember a failure without stopping the session
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$LOG"
    local started=$SECONDS
    if "$@" >>"$LOG" 2>&1; then
        echo "   ok in $((SECONDS - started)) s" | tee -a "$LOG"
    else
        echo "   FAILED (exit $?) in $((SECONDS - started)) s; see $LOG" | tee -a "$LOG"
        status=1
    fi
}

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu STEPS=4 MORE=2 PRECISION=bf16 LIMIT=8
    TINY=(model.n_layers=2 model.d_model=64 model.n_heads=4 model.ffn_hidden_size=172 training.seq_len=64
          training.global_batch_size=8 training.micro_batch_size=4 training.eval_every_steps=0
          training.save_every_steps=2 schedule.warmup_steps=1
          training.compile=false)  # compiled steps are tested elsewhere; on a CPU they cost 7 s a run
    BENCH=(--smoke --no-compile --activations polynorm)
else
    DEVICE=cuda STEPS=100 MORE=20 PRECISION=bf16 LIMIT=200
    TINY=(training.compile=true)
    BENCH=()
fi
COMMON=(training.device="$DEVICE" training.precision=$PRECISION logging.wandb_mode=disabled logging.progress_bar=false
        "${TINY[@]}" "${EXTRA[@]}")
MOE=(model.family=moe model.qk_norm=true model.moe.num_experts=8 model.moe.top_k=2 model.moe.expert_hidden_size=256)
QUICKSTART=configs/experiments/quickstart/polynorm.yaml

for stage in $STAGES; do
    case $stage in
    bench)
        step "bench_gpu" "$PYTHON" scripts/bench_gpu.py --json "$OUT_DIR/gpu.json" "${BENCH[@]}"
        ;;
    commands)
        step "train dense polynorm" "$PYTHON" -m polycom_lm.cli train $QUICKSTART "${COMMON[@]}" \
            training.max_steps=$STEPS training.output_dir="$RUNS/dense"
        step "train moe polynorm" "$PYTHON" -m polycom_lm.cli train $QUICKSTART "${COMMON[@]}" "${MOE[@]}" \
            training.max_steps=$STEPS training.output_dir="$RUNS/moe"
        step "torchrun fsdp" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m polycom_lm.cli \
            train $QUICKSTART "${COMMON[@]}" distributed.backend=fsdp training.max_steps=$STEPS \
            training.output_dir="$RUNS/fsdp"
        step "resume dense" "$PYTHON" -m polycom_lm.cli train $QUICKSTART "${COMMON[@]}" \
            training.max_steps=$((STEPS + MORE)) training.output_dir="$RUNS/dense" --resume
        if [ -d "$EVAL_DIR" ]; then
            step "eval dense" "$PYTHON" -m polycom_lm.cli eval "$RUNS/dense" --tasks piqa,arc_easy \
                --limit $LIMIT --data-dir "$EVAL_DIR" --device "$DEVICE" --dtype bf16 --out "$OUT_DIR/eval.json"
        else
            echo "== eval skipped: no $EVAL_DIR folder (see the top of this script)" | tee -a "$LOG"
        fi
        step "export dense" "$PYTHON" -m polycom_lm.cli export "$RUNS/dense" --out "$RUNS/dense_export" --force
        step "load export in transformers" "$PYTHON" - "$RUNS/dense_export" "$DEVICE" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, device = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(device)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tokenizer("The function returns", return_tensors="pt").input_ids.to(device)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
print("transformers generate:", repr(tokenizer.decode(out[0])))
EOF
        "$PYTHON" - "$RUNS" "$OUT_DIR/commands.json" <<'EOF' | tee -a "$LOG"
import json
import sys
from pathlib import Path

from polycom_lm.train.callbacks.metrics_file import read_metrics

runs, summary = Path(sys.argv[1]), {}
for run in sorted(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file()):
    rows = read_metrics(run / "metrics.jsonl")
    train = [row for row in rows if row.get("kind") == "train"]
    evals = [row for row in rows if row.get("kind") == "eval"]
    if train:
        last = train[-1]
        summary[run.name] = {"step": last["step"], "loss": last["loss"], "tokens_per_s": last.get("tokens_per_s"),
                             "mfu": last.get("mfu"), "validation": {row.get("name", "?"): row["loss"] for row in evals[-3:]}}
        print(f"{run.name}: step {last['step']}, loss {last['loss']:.4f}, {last.get('tokens_per_s') or 0:.0f} tok/s, "
              f"MFU {100 * (last.get('mfu') or 0):.1f}%")
Path(sys.argv[2]).write_text(json.dumps(summary, indent=2))
EOF
        ;;
    *)
        echo "unknown stage '$stage' (valid: bench, commands)" >&2
        exit 2
        ;;
    esac
done
exit $status
