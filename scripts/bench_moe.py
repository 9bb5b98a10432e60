"""Mixture of experts streamed by expert, against the same model streamed by whole layers.

usage: python scripts/bench_moe.py [--layers 2] [--tokens 32] [--shapes qwen3-30b-a3b|gpt-oss-20b] [--small]
                                  [--dir DIR] [--json PATH] [--warm] [--keep]

A random model with Qwen3-30B-A3B's per-layer shapes (hidden 2048, 32 query / 4 KV heads of 128, 128 experts of
intermediate size 768, 8 per token, vocab 151936) but only --layers decoder layers, so that it fits the disk
(about 1.2 GB of experts per layer in bf16), or gpt-oss-20b's (--shapes gpt-oss-20b: hidden 2880, 32 experts of
2880, 4 per token, vocab 201088); --small uses toy shapes (a run of seconds, to check the script).
Reports, in one run:
- bytes read from disk per generated token: streamed by expert (an expert cache of one token's experts) against
  whole-layer streaming (every expert blob of every layer read on each pass), next to the routed experts' own size;
- tokens/s plain and speculative (n-gram drafts) by expert and by whole layers;
- expert cache hit rate by cache size and policy (lru, lfu), and prefetch accuracy of the two predictors;
- the target pass time and experts read against tree size (each size from an empty expert cache).
The model's routing is random (random weights): hit rates and prefetch accuracy on a trained model differ.
Timings on a shared machine are noisy: compare rows of one run. Writes everything as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offspec.console import quiet_libraries  # noqa: E402

quiet_libraries()

QWEN3_30B_A3B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                     vocab_size=151936, norm_topk_prob=True)
GPT_OSS_20B = dict(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
                   num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128)
SMALL = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64,
             intermediate_size=256, num_experts=16, num_experts_per_tok=4, vocab_size=1024, norm_topk_prob=True)


def make_model(folder: Path, layers: int, small: bool, shapes: str = "qwen3-30b-a3b") -> Path:
    """A random checkpoint (bf16) of those shapes saved by transformers, once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    if shapes == "gpt-oss-20b" and not small:
        types = (["sliding_attention", "full_attention"] * layers)[:layers]
        config = AutoConfig.for_model("gpt_oss", num_hidden_layers=layers, max_position_embeddings=4096,
                                      tie_word_embeddings=False, layer_types=types, **GPT_OSS_20B)
    else:
        config = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, max_position_embeddings=4096,
                                      tie_word_embeddings=False, **(SMALL if small else QWEN3_30B_A3B))
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(folder, max_shard_size="2GB")
    del model
    return folder


def open_by_expert(store: Path, slots: int | None, policy: str = "lru", prefetch: str | None = None, warm=False):
    from offspec.runtime.model import OffloadedModel
    from offspec.runtime.plan import DISK, ResidencyPlan
    from offspec.store.manifest import read_manifest

    man = read_manifest(store)
    b, r = man.layer_bytes, man.resident.size
    plan = ResidencyPlan(tuple([DISK] * len(b)), tuple(b), r, 0, 0, 2, max(b))  # shared parts streamed too
    return OffloadedModel(store, plan, cache_tokens=512, expert_slots=slots, expert_policy=policy,
                          expert_prefetch=prefetch, warm=warm)


def whole_layers(model) -> None:
    """Make a model read every expert blob of each MoE layer on every pass (whole-layer streaming's reads)."""
    cache = model.experts
    for i, lay in cache.layers.items():
        every = list(range(lay.module.num_experts))
        module = model.layers[i].get_submodule(lay.module.path)

        def read_all(_m, _a, _k, lay=lay, every=every):
            lay.where.clear()
            lay.free = list(range(lay.slots))
            for e in every:
                cache._load(lay, lay.slab, lay.free.pop(), e)
            lay.where.update({e: s for s, e in enumerate(reversed(every))})

        module.register_forward_pre_hook(read_all, with_kwargs=True, prepend=True)  # before the binding hook


def run_generation(model, prompt: list[int], tokens: int, spec: bool) -> dict:
    from offspec.generate import Engine, GenerationConfig, generate
    from offspec.speculative.drafters import NgramDrafter

    engine = Engine(model, drafter=NgramDrafter(min_n=1) if spec else None)
    model.reset()
    t0 = time.perf_counter()
    res = generate(engine, prompt, GenerationConfig(max_new_tokens=tokens, spec=spec, budget=16 if spec else None))
    s = res.stats
    return {"tokens": s.tokens, "tok_per_s": s.tok_per_s, "passes": s.passes, "tokens_per_pass": s.tokens_per_pass,
            "streamed_bytes_per_token": s.streamed_bytes_per_token, "experts_read": s.experts_read,
            "experts_routed": s.experts_routed, "expert_hit_rate": s.expert_hit_rate,
            "experts_prefetched": s.experts_prefetched, "prefetch_accuracy": s.prefetch_accuracy,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--small", action="store_true", help="toy shapes: check the script in seconds")
    ap.add_argument("--shapes", choices=("qwen3-30b-a3b", "gpt-oss-20b"), default="qwen3-30b-a3b",
                    help="whose per-layer shapes (gpt-oss-20b: 32 experts, top-4, about 1.6 GB of experts per layer)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offspec-bench-moe"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--warm", action="store_true", help="let the page cache keep blobs (default: cold reads)")
    ap.add_argument("--keep", action="store_true", help="keep the random model and its store for later runs")
    args = ap.parse_args()

    from offspec.runtime.pass_curve import measure_pass_curve
    from offspec.store.convert import convert_model
    from offspec.store.manifest import read_manifest

    work = args.dir / ("small" if args.small else f"{args.shapes}-{args.layers}l")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = make_model(work / "src", args.layers, args.small, args.shapes)
    store = convert_model(src, work / "store", bits=16, dtype="bfloat16", progress=False)
    man = read_manifest(store)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src).to_dict()
    E, k = len(man.experts[-1]), cfg["num_experts_per_tok"]
    expert_blob = man.experts[0][0].size
    dense = sum(man.layer_bytes)
    print(f"model: {man.num_layers} layers, {E} experts of {expert_blob / 1e6:.2f} MB, top-{k}; shared parts "
          f"{dense / 1e6:.1f} MB; built and converted in {time.perf_counter() - t0:.0f} s")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (16,), generator=g).tolist()
    prompt = prompt + prompt[:8]  # a repeat, so n-grams propose something
    out: dict = {"config": {k_: cfg.get(k_) for k_ in ("model_type", "hidden_size", "num_local_experts",
                                                       "num_experts_per_tok", "moe_intermediate_size",
                                                       "intermediate_size", "num_hidden_layers", "vocab_size")},
                 "expert_blob_bytes": expert_blob, "shared_layer_bytes": dense}

    # 1-2. bytes per token and tokens/s: by expert vs whole layers, plain and speculative
    rows = {}
    for mode in ("by expert", "whole layers"):
        for spec in (False, True):
            model = open_by_expert(store, E if mode == "whole layers" else k, warm=args.warm)
            if mode == "whole layers":
                whole_layers(model)
            try:
                rows[f"{mode}, {'speculative' if spec else 'plain'}"] = run_generation(model, prompt, args.tokens,
                                                                                      spec)
            finally:
                model.close()
    routed_bytes = k * expert_blob * man.num_layers + dense
    print(f"\nrouted experts and shared parts of one token: {routed_bytes / 1e6:.1f} MB")
    print(f"{'':28} {'tok/s':>8} {'tok/pass':>9} {'MB/token':>10} {'x routed':>9} {'experts read/pass':>18}")
    for name, r in rows.items():
        print(f"{name:28} {r['tok_per_s']:8.2f} {r['tokens_per_pass']:9.2f} "
              f"{r['streamed_bytes_per_token'] / 1e6:10.1f} {r['streamed_bytes_per_token'] / routed_bytes:9.2f} "
              f"{r['experts_read'] / max(r['passes'], 1):18.1f}")
    out["generation"] = rows
    out["routed_bytes_per_token"] = routed_bytes

    # 3. cache hit rate by cache size and policy; prefetch accuracy by predictor
    cache_rows = []
    sizes = sorted({k, 2 * k, 4 * k, E // 2, E} & set(range(1, E + 1)))
    for slots in sizes:
        for policy, prefetch in (("lru", None), ("lfu", None), ("lru", "previous"), ("lru", "gate")):
            if prefetch and slots not in (k, 2 * k):
                continue
            model = open_by_expert(store, slots, policy, prefetch, warm=args.warm)
            try:
                r = run_generation(model, prompt, args.tokens, False)
            finally:
                model.close()
            cache_rows.append({"slots": slots, "policy": policy, "prefetch": prefetch, **r})
    print(f"\n{'slots':>6} {'policy':>6} {'prefetch':>9} {'hit rate':>9} {'read/pass':>10} {'prefetched':>11} "
          f"{'accuracy':>9} {'MB/token':>9}")
    for r in cache_rows:
        print(f"{r['slots']:6d} {r['policy']:>6} {str(r['prefetch'] or '-'):>9} {r['expert_hit_rate']:9.2%} "
              f"{r['experts_read'] / max(r['passes'], 1):10.1f} {r['experts_prefetched']:11d} "
              f"{r['prefetch_accuracy']:9.2%} {r['streamed_bytes_per_token'] / 1e6:9.1f}")
    out["cache"] = cache_rows

    # 4. pass time and experts read against tree size (each from an empty expert cache)
    model = open_by_expert(store, E, warm=args.warm)
    try:
        reads: dict[int, int] = {}
        curve = measure_pass_curve(model, sizes=(1, 4, 16, 64), prefix=8, experts_read=reads)
    finally:
        model.close()
    print(f"\n{'tree':>5} {'pass s':>8} {'experts read':>13} {'of':>5}")
    for t, s in curve.items():
        print(f"{t:5d} {s:8.3f} {reads[t]:13d} {E * man.num_layers:5d}")
    out["pass_curve"] = {str(t): {"pass_s": s, "experts_read": reads[t]} for t, s in curve.items()}

    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
