#!/usr/bin/env python
"""Aggregate throughput and latency of `offspec serve` for 1, 2, 4, 8 concurrent clients, plain and speculative.

Starts the server in this process (the same app, scheduler and batched engine as `offspec serve`) on a free
port of 127.0.0.1, loads the model once per mode with KV caches for the largest client count, then for each
client count sends one streamed chat request per client, all at once, and times them over HTTP: aggregate
tokens/s (all answers' tokens over the wall time from the first request to the last answer), each request's
latency and time to its first token, target passes and tokens per pass. Prints a table, writes JSON.

  python scripts/bench_serve.py --device-memory min+512MiB --json bench-out/serve.json
  python scripts/bench_serve.py --modes plain,ngram --clients 1,8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"plain": (False, None), "spec": (True, None), "ngram": (True, "ngram"), "self": (True, "self")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default=None, help="target (default: the demo model)")
    p.add_argument("--draft", default=None, help="draft model for the 'spec' mode (default: the demo's draft)")
    p.add_argument("--bits", type=int, default=4, help="target store bits when converting (default 4: NF4)")
    p.add_argument("--device-memory", default="min+512MiB")
    p.add_argument("--ctx-size", type=int, default=1024, help="tokens of context per request")
    p.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--modes", default="plain,spec", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length of each request")
    p.add_argument("--budget", default="auto", help="tree budget per pass (auto or a number), split among requests")
    p.add_argument("--prompts", default=str(ROOT / "offspec" / "data" / "bench_prompts.json"),
                   help="JSON list of {prompt} (or strings); client i asks prompt i mod len")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warm", action="store_true", help="let the page cache keep streamed layers")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def load_prompts(path: str) -> list[str]:
    data = json.loads(Path(path).read_text())
    return [d["prompt"] if isinstance(d, dict) else str(d) for d in data]


def ask(port: int, prompt: str, max_tokens: int, model: str) -> dict:
    """One streamed chat request: latency, time to the first token, completion tokens (from the usage)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, tokens, text = None, 0, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if "error" in obj:
            raise RuntimeError(obj["error"]["message"])
        for ch in obj.get("choices", []):
            piece = ch.get("delta", {}).get("content")
            if piece:
                text.append(piece)
                first = first or time.perf_counter()
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return {"latency_s": end - t0, "ttft_s": (first or end) - t0, "tokens": tokens, "text": "".join(text),
            "start": t0, "end": end}


def run_mode(args, mode: str, clients: list[int], prompts: list[str]) -> list[dict]:
    from offspec import console
    from offspec.batch import BatchEngine
    from offspec.cli.serve import _listen
    from offspec.config import RuntimeConfig, parse_budget
    from offspec.generate import GenerationConfig
    from offspec.loader import load_engine
    from offspec.scheduler import Scheduler
    from offspec.server import ServeState, create_app, make_server

    spec, drafter = MODES[mode]
    draft = args.draft if mode == "spec" else drafter
    rc = RuntimeConfig.from_flags("cpu", args.device_memory, None, args.warm, args.bits, "bfloat16")
    budget = parse_budget(args.budget)
    with console.quiet_transformers():
        loaded = load_engine(args.model, draft, spec=spec, rc=rc, cache_tokens=args.ctx_size, progress=False,
                             budget_auto=budget is None, sequences=max(clients))
    engine = loaded.engine
    target = engine.target
    batch = BatchEngine(engine, loaded.sequences)
    defaults = GenerationConfig(max_new_tokens=args.max_tokens, spec=spec, budget=budget)
    state = ServeState(Scheduler(batch, max(clients)), loaded.tokenizer, "bench", engine.context_tokens, defaults)
    state.scheduler.start()
    sock = _listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(create_app(state), "127.0.0.1", port, state.scheduler.request_stop)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    plan = target.plan
    print(f"{mode}: {loaded.drafter or 'plain decoding'}; {len(plan.layers('disk'))} of {len(plan.tiers)} target "
          f"layers streamed ({plan.streamed_bytes_per_pass / 2**30:.2f} GiB per pass); "
          f"{loaded.sequences} slots", file=sys.stderr, flush=True)
    rows = []
    try:
        for c in clients:
            passes0, stats0 = batch.passes, engine.stats.passes
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                got = list(pool.map(lambda i: ask(port, prompts[i % len(prompts)], args.max_tokens, "bench"),
                                    range(c)))
            wall = max(g["end"] for g in got) - t0
            tokens = sum(g["tokens"] for g in got)
            passes = batch.passes - passes0
            row = {"mode": mode, "drafter": loaded.drafter, "clients": c, "tokens": tokens, "wall_s": wall,
                   "aggregate_tok_s": tokens / wall, "latency_mean_s": sum(g["latency_s"] for g in got) / c,
                   "latency_max_s": max(g["latency_s"] for g in got),
                   "ttft_mean_s": sum(g["ttft_s"] for g in got) / c, "passes": passes,
                   "tokens_per_pass": tokens / passes if passes else 0.0,
                   "spec_passes": engine.stats.passes - stats0,
                   "streamed_gib_per_pass": plan.streamed_bytes_per_pass / 2**30,
                   "answers": [g["text"] for g in got]}
            rows.append(row)
            print(f"  {c} client{'s' if c > 1 else ''}: {tokens} tokens in {wall:.1f} s = "
                  f"{row['aggregate_tok_s']:.2f} tok/s, latency {row['latency_mean_s']:.1f} s, {passes} passes",
                  file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
        state.scheduler.stop()
        batch.close()
        loaded.close()
    base = next((r for r in rows if r["clients"] == 1), rows[0])
    for r in rows:
        r["x_one_client"] = r["aggregate_tok_s"] / base["aggregate_tok_s"] if base["aggregate_tok_s"] else 0.0
    return rows


def table(rows: list[dict]) -> str:
    head = ("| mode | clients | tokens | wall s | aggregate tok/s | × 1 client | latency mean s | latency max s | "
            "first token s | passes | tokens/pass |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['mode']} ({r['drafter'] or 'none'}) | {r['clients']} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['aggregate_tok_s']:.2f} | {r['x_one_client']:.2f} | {r['latency_mean_s']:.1f} | "
                     f"{r['latency_max_s']:.1f} | {r['ttft_mean_s']:.1f} | {r['passes']} | "
                     f"{r['tokens_per_pass']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not clients or min(clients) < 1:
        sys.exit(f"bad --modes {bad} or --clients {args.clients}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(args.prompts)
    rows = []
    for mode in modes:
        rows += run_mode(args, mode, clients, prompts)
    print(table(rows))
    if args.json:
        out = {"settings": vars(args), "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                   "threads": torch.get_num_threads()}, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
