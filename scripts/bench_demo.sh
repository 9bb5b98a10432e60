#!/usr/bin/env bash
# The demo-pair benchmark behind docs/benchmarks.md: bf16 and NF4 targets, most layers streamed cold.
# Usage: scripts/bench_demo.sh [16|4] [extra offspec bench flags]   (PEER= to skip the accelerate peer)
set -euo pipefail
cd "$(dirname "$0")/.."
bits=${1:-16}; shift || true
peer=${PEER-accelerate}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
mkdir -p bench-out
.venv/bin/offspec bench --bits "$bits" --device-memory min+512MiB --budgets auto,16,64,256 \
  --max-new-tokens 32 --prompts scripts/bench_prompts_4.json ${peer:+--peer "$peer"} \
  --json "bench-out/demo-${bits}bit.json" --plot "bench-out/demo-${bits}bit.png" "$@"
