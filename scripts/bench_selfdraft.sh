#!/usr/bin/env bash
# The drafters benchmark behind docs/benchmarks.md "Self-drafting on the CPU": the demo target as bf16, most layers
# streamed cold (--device-memory min+512MiB), plain decoding against the self-draft, n-grams, the 0.5B draft and
# the planner choosing among them (auto), each at the auto budget; then the self-draft at fixed budgets 64 and 256.
# Usage: scripts/bench_selfdraft.sh [extra offspec bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
mkdir -p bench-out
target=$(.venv/bin/python -c "from offspec.store.demo import demo_target_gguf; print(demo_target_gguf())")
draft=$(.venv/bin/python -c "from offspec.store.demo import demo_draft; print(demo_draft(progress=False))")
.venv/bin/offspec bench -m "$target" --bits 16 --device-memory min+512MiB --budgets auto --max-new-tokens 32 \
  --prompts scripts/bench_prompts_4.json --drafters "self,ngram,$draft,auto" \
  --json bench-out/selfdraft-auto.json "$@"
.venv/bin/offspec bench -m "$target" --bits 16 --device-memory min+512MiB --budgets 64,256 --max-new-tokens 48 \
  --prompts scripts/bench_prompts_4.json --drafters self --json bench-out/selfdraft-budgets.json "$@"
