#!/usr/bin/env bash
# Runtime-only benchmark behind docs/benchmarks.md: every target layer streamed cold, no draft.
# Raw cold read bandwidth vs achieved streamed bytes per second, and the pass-time curve.
# Usage: scripts/bench_stream.sh [16|4] [extra offspec bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bits=${1:-16}; shift || true
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
mkdir -p bench-out
exec .venv/bin/offspec bench --bits "$bits" --no-spec --device-memory min --repeats 2 --max-new-tokens 8 \
  --prompts scripts/bench_prompts_4.json --json "bench-out/stream-${bits}bit.json" "$@"
