"""Tokens per pass and drafting time per drafter on the demo target (greedy), one JSON line per run.

Usage: python scripts/drafters_tokens_per_pass.py docs/bench/drafters-prompts.json out.jsonl
"""
import json, sys, time
from offspec.config import RuntimeConfig
from offspec.generate import GenerationConfig, generate
from offspec.loader import load_engine
from offspec.bench import prompt_ids

prompts = json.load(open(sys.argv[1]))
out = open(sys.argv[2], "a")
plan = [("ngram", None, 64, 48, [0, 1, 2, 3, 4, 5]),
        ("self", None, 256, 24, [0, 1]),
        ("self", True, 256, 24, [0, 1])]
rc = RuntimeConfig(device="cpu", dtype="bfloat16")
for draft, ngram, budget, n, which in plan:
    t0 = time.perf_counter()
    loaded = load_engine(None, draft, rc=rc, cache_tokens=1024, progress=False, budget_auto=False, ngram=ngram)
    eng = loaded.engine
    print(f"loaded {loaded.drafter} in {time.perf_counter() - t0:.0f} s; tiers {eng.target.plan.tiers.count('disk')} streamed", flush=True)
    for i in which:
        p = prompts[i]
        ids = prompt_ids(loaded.tokenizer, p["prompt"])
        eng.reset()
        cfg = GenerationConfig(max_new_tokens=n, budget=budget, stop_ids=tuple(eng.eos_ids))
        res = generate(eng, ids, cfg)
        s = res.stats
        row = {"drafter": loaded.drafter, "budget": budget, "kind": p["kind"], "prompt": i, **s.to_dict(),
               "draft_ms_per_pass": 1000 * s.draft_s / max(s.passes, 1), "text": res.text}
        out.write(json.dumps(row) + "\n"); out.flush()
        print(loaded.drafter, p["kind"], i, f"tok/pass {s.tokens_per_pass:.2f} draft ms/pass {row['draft_ms_per_pass']:.1f} passes {s.passes} ahead {s.ahead_used}/{s.ahead_started}", flush=True)
    eng.close()
