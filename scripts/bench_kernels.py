"""Low-bit CPU kernels side by side: speed on a model-sized working set, and draft quality on a real model.

usage: python scripts/bench_kernels.py [--layers 28] [--rows 1,4,16,64,256] [--threads 1,2] [--json PATH]
                                      [--store DIR] [--tokens 256] [--no-quality]

Speed: every linear of Qwen2.5-1.5B's decoder layers plus its 151936-row lm_head (random weights, far larger
than the CPU caches), held as dense bf16 and in each format of offspec.models.qlinear, one full pass of all of
them per measurement with T rows of bf16 input: ms per pass, GB/s of weight bytes, GFLOP/s, against dense bf16
and against the time to read the same bytes from RAM (measured in the same run). The "paths" rows force each
kernel of a format whose dispatch depends on the row count (int8: int8pack vs dequantize + matmul).

Quality: the packaged Qwen2.5-Coder-0.5B (bf16 store), its decoder layers' linears and lm_head quantized in each
format, run over a few hundred tokens of code and of prose from this repository: top-1 agreement and
KL(bf16 || format) per position against the bf16 model, and its whole forward's time at 1 and 64 rows.
Timings on a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offspec.console import quiet_libraries  # noqa: E402

quiet_libraries()

from offspec.models.qlinear import FORMATS, QuantLinear, cpu_kernels, quantize_linear, quantize_linears  # noqa: E402

# Qwen2.5-1.5B: hidden 1536, MLP 8960, 12 query heads and 2 KV heads of 128, 28 layers, vocab 151936 (lm_head)
HIDDEN, INTER, KV_DIM, LAYERS, VOCAB = 1536, 8960, 256, 28, 151936
LAYER_LINEARS = [  # name, out, in, bias
    ("q", HIDDEN, HIDDEN, True), ("k", KV_DIM, HIDDEN, True), ("v", KV_DIM, HIDDEN, True), ("o", HIDDEN, HIDDEN, False),
    ("gate", INTER, HIDDEN, False), ("up", INTER, HIDDEN, False), ("down", HIDDEN, INTER, False),
]
TEXTS = {"code": ROOT / "offspec" / "runtime" / "model.py", "prose": ROOT / "docs" / "architecture.md"}


class Dense(torch.nn.Module):
    """The baseline: a bf16 weight and F.linear."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().__init__()
        self.w = w.to(torch.bfloat16).contiguous()
        self.b = None if b is None else b.to(torch.bfloat16)
        self.nbytes = self.w.numel() * 2 + (0 if b is None else b.numel() * 2)

    def forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


def build_linears(fmt: str, layers: int) -> list[tuple[int, torch.nn.Module]]:
    """(in_features, module) for every linear of the model in `fmt` ("bf16" = dense), same random weights each
    format, a separate copy per layer (so that the working set is the whole model)."""
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[int, torch.nn.Module]] = []
    protos = {}
    for name, n, k, bias in LAYER_LINEARS:
        w = torch.randn(n, k, generator=gen) * k ** -0.5
        b = torch.randn(n, generator=gen) * 0.1 if bias else None
        protos[name] = (w, b, Dense(w, b) if fmt == "bf16" else QuantLinear.from_weight(w, b, fmt))
    for _ in range(layers):
        for name, n, k, _bias in LAYER_LINEARS:
            w, b, proto = protos[name]
            # fbgemm's packed weight cannot be deep-copied: pack it again
            mod = QuantLinear.from_weight(w, b, fmt) if fmt == "w8a8" else copy.deepcopy(proto)
            out.append((k, mod))
    del protos
    head = torch.randn(VOCAB, HIDDEN, generator=gen) * HIDDEN ** -0.5
    out.append((HIDDEN, Dense(head, None) if fmt == "bf16" else QuantLinear.from_weight(head, None, fmt)))
    return out


def ram_read_gbps(nbytes: int = 1 << 30, reps: int = 3) -> float:
    """Read bandwidth of a sum over a buffer far larger than the caches (best of reps)."""
    buf = torch.ones(nbytes // 4)
    buf.sum()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def time_pass(linears, rows: int, path: str | None, min_s: float = 1.0, max_reps: int = 3) -> float:
    """Median seconds of one pass through every linear with `rows` rows of bf16 input."""
    gen = torch.Generator().manual_seed(rows)
    xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in {k for k, _ in linears}}

    def one() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for k, mod in linears:
                mod(xs[k], path) if path else mod(xs[k])
        return time.perf_counter() - t

    first = one()  # warm-up (buffers, first-touch); kept as a sample when a pass is slow anyway
    times = [first] if first > min_s else []
    while len(times) < max_reps and sum(times) < min_s:
        times.append(one())
    return statistics.median(times)


def bench_speed(args) -> list[dict]:
    records = []
    fmts = ["bf16", *args.formats]
    for fmt in fmts:
        t0 = time.perf_counter()
        linears = build_linears(fmt, args.layers)
        nbytes = sum(m.nbytes for _, m in linears)
        params = sum(k * (m.out_features if hasattr(m, "out_features") else m.w.shape[0]) for k, m in linears)
        print(f"[{fmt}] built {len(linears)} linears, {nbytes / 1e9:.2f} GB, in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        paths = [None]
        if fmt != "bf16" and len(linears[0][1].kernel.paths()) > 1:
            paths += list(linears[0][1].kernel.paths())
        for threads in args.threads:
            torch.set_num_threads(threads)
            gbps = ram_read_gbps()
            for rows in args.rows:
                for path in paths:
                    s = time_pass(linears, rows, path)
                    rec = {"format": fmt, "path": path or (linears[0][1].path_for(rows) if fmt != "bf16" else "dense"),
                           "forced": path is not None, "threads": threads, "rows": rows, "ms": s * 1e3,
                           "weight_bytes": nbytes, "weight_gbps": nbytes / s / 1e9, "gflops": 2 * rows * params / s / 1e9,
                           "ram_read_gbps": gbps, "ram_read_ms": nbytes / gbps / 1e6}
                    records.append(rec)
                    print(f"  {fmt:5s} {rec['path']:9s}{'*' if path else ' '} threads={threads} T={rows:4d} "
                          f"{rec['ms']:9.1f} ms  {rec['weight_gbps']:5.1f} GB/s  {rec['gflops']:6.1f} GFLOP/s  "
                          f"RAM read {rec['ram_read_ms']:6.1f} ms", file=sys.stderr, flush=True)
        del linears
        gc.collect()
    dense = {(r["threads"], r["rows"]): r["ms"] for r in records if r["format"] == "bf16"}
    for r in records:
        r["vs_bf16"] = dense[(r["threads"], r["rows"])] / r["ms"]
        r["vs_ram_read"] = r["ms"] / r["ram_read_ms"]
    return records


def find_store(name: str) -> Path | None:
    from offspec.paths import offspec_home

    found = sorted((offspec_home() / "stores").glob(name))
    return found[0] if found else None


def open_resident(store: Path, cache_tokens: int):
    from offspec.runtime.model import OffloadedModel
    from offspec.runtime.plan import plan_residency
    from offspec.store.manifest import read_manifest

    man = read_manifest(store)
    plan = plan_residency(list(man.layer_bytes), man.resident.size, 1 << 40)
    return OffloadedModel(store, plan, "cpu", cache_tokens=cache_tokens)


def bench_quality(args) -> list[dict]:
    from transformers import AutoTokenizer

    store = Path(args.store) if args.store else find_store("qwen2.5-coder-0.5b*bf16*")
    if store is None or not store.exists():
        print("no Qwen2.5-Coder-0.5B bf16 store found (pass --store); skipping quality", file=sys.stderr)
        return []
    tok = AutoTokenizer.from_pretrained(store)
    full = {kind: tok(path.read_text())["input_ids"] for kind, path in TEXTS.items()}
    texts = {kind: ids[: args.tokens] for kind, ids in full.items()}
    timing = full["code"][:128]  # a 64-token prefix, then up to 64 rows timed
    torch.set_num_threads(max(args.threads))
    records = []
    want: dict[str, torch.Tensor] = {}
    for fmt in ["bf16", *args.formats]:
        model = open_resident(store, cache_tokens=max(args.tokens, 128) + 16)
        t0 = time.perf_counter()
        if fmt != "bf16":
            for layer in model.layers:
                quantize_linears(layer, fmt)
            model.lm_head = quantize_linear(model.lm_head, fmt)
        built_s = time.perf_counter() - t0
        rec = {"format": fmt, "store": store.name, "quantize_s": built_s, "threads": max(args.threads)}
        for kind, ids in texts.items():
            model.reset()
            logits = model.forward(torch.tensor([ids]))[0].float()  # [T, V]
            if fmt == "bf16":
                want[kind] = logits
                continue
            ref = want[kind]
            rec[f"top1_{kind}"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rec[f"kl_{kind}"] = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                         reduction="batchmean").item()
        for rows in (1, 64):  # the whole draft forward (attention, norms, lm_head) after a 64-token prefix
            times = []
            for _ in range(3):
                model.reset()
                model.forward(torch.tensor([timing[:64]]))
                t = time.perf_counter()
                model.forward(torch.tensor([timing[64: 64 + rows]]))
                times.append(time.perf_counter() - t)
            rec[f"forward_ms_T{rows}"] = statistics.median(times) * 1e3
        model.close()
        records.append(rec)
        print(f"[quality] {fmt:5s} " + " ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float)),
              file=sys.stderr, flush=True)
        del model
        gc.collect()
    return records


def print_tables(speed: list[dict], quality: list[dict]) -> None:
    if speed:
        print(f"{'format':6s} {'kernel':10s} {'thr':>3s} {'T':>4s} {'ms/pass':>9s} {'GB/s':>6s} {'GFLOP/s':>8s} "
              f"{'x bf16':>7s} {'x RAM read':>10s}")
        for r in speed:
            kernel = r["path"] + ("*" if r["forced"] else "")
            print(f"{r['format']:6s} {kernel:10s} {r['threads']:3d} {r['rows']:4d} {r['ms']:9.1f} "
                  f"{r['weight_gbps']:6.1f} {r['gflops']:8.1f} {r['vs_bf16']:7.2f} {r['vs_ram_read']:10.2f}")
    if quality:
        print()
        print(f"{'format':6s} {'top1 code':>9s} {'top1 prose':>10s} {'KL code':>8s} {'KL prose':>8s} "
              f"{'fwd T=1 ms':>10s} {'fwd T=64 ms':>11s}")
        for r in quality:
            q = [r.get(k) for k in ("top1_code", "top1_prose", "kl_code", "kl_prose")]
            cells = ["-" if v is None else f"{v:.3f}" if i < 2 else f"{v:.4f}" for i, v in enumerate(q)]
            print(f"{r['format']:6s} {cells[0]:>9s} {cells[1]:>10s} {cells[2]:>8s} {cells[3]:>8s} "
                  f"{r['forward_ms_T1']:10.1f} {r['forward_ms_T64']:11.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=LAYERS, help="decoder layers of Qwen2.5-1.5B shapes (default 28)")
    ap.add_argument("--rows", default="1,4,16,64,256", help="rows of input per pass, comma-separated")
    ap.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"formats among {','.join(FORMATS)}")
    ap.add_argument("--store", default=None, help="a bf16 store for the quality part (default: the packaged 0.5B)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of each text for the quality part")
    ap.add_argument("--no-quality", action="store_true", help="speed only")
    ap.add_argument("--no-speed", action="store_true", help="quality only")
    ap.add_argument("--json", default=None, help="write all records to this file")
    args = ap.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {', '.join(bad)}; choose among {', '.join(FORMATS)}")
    caps = cpu_kernels()
    print(f"cpu: {caps}", file=sys.stderr)
    speed = [] if args.no_speed else bench_speed(args)
    quality = [] if args.no_quality else bench_quality(args)
    print_tables(speed, quality)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": caps.__dict__, "torch": torch.__version__, "speed": speed,
                                               "quality": quality}, indent=1))


if __name__ == "__main__":
    main()
