#!/usr/bin/env bash
# The GPU benchmark behind docs/benchmarks.md ("On a CUDA GPU"): random-weight models of real shapes
# (Qwen2.5-7B target, Qwen2.5-0.5B draft), converted to bf16 and NF4 stores, `offspec bench` on the host
# tier (layers pinned in RAM, copied each pass) and the disk tier (layers read from disk each pass), the
# machine's ceilings (scripts/rawbw.py), and the predicted speculative speed-up (scripts/gpu_summary.py).
#
# Usage: TOKDIR=DIR scripts/bench_gpu.sh
#   TOKDIR   a folder with a Qwen2.5 tokenizer (e.g. a converted demo store under ~/.cache/offspec/stores)
#   OUT      results folder (default bench-out/gpu); MODELS: random models and stores (default $OUT/models)
#   SHAPE    target shape (default qwen7b; qwen14b if the disk allows)
#   BITS     stores to bench (default "16 4"); TIERS (default "host disk")
#   BUDGETS  (default 16,64,256,1024); NEW (max new tokens, default 32); REPEATS (default 2)
#   HOST_MEM host budget of the host tier (default 64GiB); DISK_HOST_MEM of the disk tier (default 1536MiB:
#            the pinned staging ring only, so every non-resident layer streams from disk)
#   DEV_MEM  device budget (default min+2GiB); ACCEPT: CPU bench JSON of the real pair for tokens per pass
#   STEPS    what to run (default "models ceilings convert bench summary"); every step skips what exists.
# Rerunnable: models, stores and the ceilings are kept; bench JSON files are rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OFFSPEC=${OFFSPEC:-.venv/bin/offspec}
OUT=${OUT:-bench-out/gpu}
MODELS=${MODELS:-$OUT/models}
SHAPE=${SHAPE:-qwen7b}
BITS=${BITS:-16 4}
TIERS=${TIERS:-host disk}
BUDGETS=${BUDGETS:-16,64,256,1024}
NEW=${NEW:-32}
REPEATS=${REPEATS:-2}
HOST_MEM=${HOST_MEM:-64GiB}
DISK_HOST_MEM=${DISK_HOST_MEM:-1536MiB}
DEV_MEM=${DEV_MEM:-min+2GiB}
ACCEPT=${ACCEPT:-docs/bench/demo-16bit.json}
STEPS=${STEPS:-models ceilings convert bench summary}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736

has() { [[ " $STEPS " == *" $1 "* ]]; }
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "bench_gpu.sh: CUDA is not available on this machine" >&2; exit 1; }
mkdir -p "$OUT" "$MODELS"

if has models; then
  for shape in "$SHAPE" qwen05b; do
    if [[ ! -f "$MODELS/$shape/config.json" ]]; then
      [[ -n "${TOKDIR:-}" ]] || { echo "bench_gpu.sh: set TOKDIR to a folder with a Qwen2.5 tokenizer" >&2; exit 1; }
      "$PY" scripts/make_random.py "$MODELS/$shape" "$shape" "$TOKDIR"
    fi
  done
fi

if has ceilings && [[ ! -f "$OUT/rawbw.json" ]]; then
  "$PY" scripts/rawbw.py "$MODELS/.rawbw-scratch.bin" > "$OUT/rawbw.json.tmp" && mv "$OUT/rawbw.json.tmp" "$OUT/rawbw.json"
fi

if has convert; then
  for bits in $BITS; do
    [[ -f "$MODELS/$SHAPE-${bits}bit/manifest.json" ]] || "$OFFSPEC" convert "$MODELS/$SHAPE" "$MODELS/$SHAPE-${bits}bit" --bits "$bits"
  done
  [[ -f "$MODELS/qwen05b-16bit/manifest.json" ]] || "$OFFSPEC" convert "$MODELS/qwen05b" "$MODELS/qwen05b-16bit" --bits 16
fi

if has bench; then
  for bits in $BITS; do
    for tier in $TIERS; do
      host=$HOST_MEM; [[ $tier == disk ]] && host=$DISK_HOST_MEM
      "$OFFSPEC" bench --device cuda --model "$MODELS/$SHAPE-${bits}bit" --draft "$MODELS/qwen05b-16bit" \
        --device-memory "$DEV_MEM" --host-memory "$host" --budgets "$BUDGETS" --max-new-tokens "$NEW" \
        --repeats "$REPEATS" --prompts scripts/bench_prompts_4.json --json "$OUT/$tier-${bits}bit.json"
    done
  done
fi

if has summary; then
  "$PY" scripts/gpu_summary.py "$OUT" --accept "$ACCEPT" | tee "$OUT/summary.txt"
fi
