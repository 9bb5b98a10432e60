"""Summarise a GPU benchmark run (scripts/bench_gpu.sh): every figure next to its ceiling, and the predicted
speculative speed-up from acceptance measured on a CPU with the real demo pair.

usage: python scripts/gpu_summary.py OUTDIR [--accept CPU_BENCH_JSON]
  OUTDIR holds rawbw.json (scripts/rawbw.py) and the `offspec bench --json` files NAME.json of the run.
  CPU_BENCH_JSON: an `offspec bench --json` of the real demo pair (default docs/bench/demo-16bit.json):
  its tokens per pass at each budget.

Random weights give the GPU's times, not acceptance; the real pair gives acceptance, not a GPU's times.
Combined, per budget B: tok/s = tokens_per_pass_cpu(B) / (pass_s_gpu(B) + draft_s_gpu(B)), against plain
decoding's 1 / pass_s_gpu(1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pass_bound_s(plan: dict, pinned_gbps: float | None, disk_gbps: float | None) -> float | None:
    """The least time one pass can take moving its weights: host->device copies at the pinned link speed,
    disk layers also read at the disk's speed (the two overlap: the slower one bounds)."""
    tiers, sizes = plan["tiers"], plan["layer_bytes"]
    disk = sum(n for n, t in zip(sizes, tiers) if t == "disk")
    moved = disk + sum(n for n, t in zip(sizes, tiers) if t == "host")
    if not moved or not pinned_gbps:
        return None
    bound = moved / (pinned_gbps * 1e9)
    if disk and disk_gbps:
        bound = max(bound, disk / (disk_gbps * 1e9))
    return bound


def plain_row(result: dict) -> dict | None:
    return next((r for r in result.get("configs", []) if r["config"] == "plain"), None)


def run_summary(name: str, result: dict, raw: dict) -> dict:
    """One bench run: its plan, the 1-token pass and the pass-time curve against the copy/read bound."""
    plan = result["plan"]
    disk_gbps = (result.get("read") or {}).get("gbps_for_limit") or max(raw.get("disk_cold_GBps") or [0]) or None
    bound = pass_bound_s(plan, raw.get("h2d_pinned_GBps"), disk_gbps)
    plain = plain_row(result)
    pass1 = plain["pass_s"] if plain else None
    return {
        "name": name,
        "layers": {k: len(v) for k, v in plan["layers"].items()},
        "moved_bytes_per_pass": sum(n for n, t in zip(plan["layer_bytes"], plan["tiers"]) if t in ("host", "disk")),
        "pass_s": pass1,
        "bound_s": bound,
        "fraction_of_limit": bound / pass1 if bound and pass1 else None,
        "curve": {c["tokens"]: c["pass_s_median"] for c in result.get("curve", [])},
        "draft_s_by_budget": {r["config"]: r["draft_s_per_pass"] for r in result.get("configs", []) if r["spec"]},
    }


def predict(accept: dict, gpu: dict) -> list[dict]:
    """Per budget present in both runs: predicted tok/s and speed-up over plain GPU decoding (and with free drafting)."""
    plain = plain_row(gpu)
    if plain is None or not plain["pass_s"]:
        return []
    gpu_rows = {r["config"]: r for r in gpu.get("configs", []) if r["spec"] and r.get("budget")}
    out = []
    for r in accept.get("configs", []):
        g = gpu_rows.get(r["config"])
        if not r.get("spec") or g is None:
            continue
        step = g["pass_s"] + g["draft_s_per_pass"]
        tok_s = r["tokens_per_pass"] / step if step > 0 else None
        out.append({"budget": int(r["config"]), "tokens_per_pass": r["tokens_per_pass"], "pass_s": g["pass_s"],
                    "draft_s": g["draft_s_per_pass"], "tok_per_s": tok_s,
                    "speedup": tok_s * plain["pass_s"] if tok_s else None,
                    "speedup_free_draft": r["tokens_per_pass"] * plain["pass_s"] / g["pass_s"] if g["pass_s"] else None})
    return sorted(out, key=lambda x: x["budget"])


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def report(outdir: Path, accept_path: Path) -> list[str]:
    raw = json.loads((outdir / "rawbw.json").read_text()) if (outdir / "rawbw.json").is_file() else {}
    lines = []
    if raw:
        lines.append(f"ceilings on {raw.get('gpu')}: pinned host->device {raw.get('h2d_pinned_GBps')} GB/s, pageable "
                     f"{raw.get('h2d_pageable_GBps')} GB/s, cold disk {raw.get('disk_cold_GBps')} GB/s")
        if raw.get("layer_ms_by_rows"):
            lines.append("one 7B-shaped bf16 layer's matmuls (ms by rows): "
                         + ", ".join(f"{k}: {v}" for k, v in raw["layer_ms_by_rows"].items()))
    accept = json.loads(accept_path.read_text()) if accept_path.is_file() else None
    for path in sorted(outdir.glob("*.json")):
        if path.name == "rawbw.json":
            continue
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or "plan" not in result:  # not an `offspec bench --json` file
            continue
        s = run_summary(path.stem, result, raw)
        lines.append("")
        lines.append(f"{s['name']}: layers {s['layers']}, {s['moved_bytes_per_pass'] / 2**30:.2f} GiB moved per pass; "
                     f"1-token pass {_f(s['pass_s'])} s, bound {_f(s['bound_s'])} s, fraction of the limit "
                     f"{_f(s['fraction_of_limit'], '.2f')}")
        lines.append("  pass s by tokens: " + ", ".join(f"{t}: {v:.3f}" for t, v in s["curve"].items()))
        if s["draft_s_by_budget"]:
            lines.append("  draft s per tree by budget: " + ", ".join(f"{b}: {v:.3f}"
                                                                       for b, v in s["draft_s_by_budget"].items()))
        if accept is not None:
            pred = predict(accept, result)
            for p in pred:
                lines.append(f"  predicted at budget {p['budget']}: {p['tokens_per_pass']:.2f} tok/pass (CPU, real pair) "
                             f"/ ({p['pass_s']:.3f} + {p['draft_s']:.3f} s) = {_f(p['tok_per_s'], '.2f')} tok/s, "
                             f"{_f(p['speedup'], '.2f')}x plain ({_f(p['speedup_free_draft'], '.2f')}x if drafting "
                             "were free)")
            best = max((p for p in pred if p["speedup"]), key=lambda p: p["speedup"], default=None)
            if best:
                lines.append(f"  predicted speculative / plain: {best['speedup']:.2f}x (budget {best['budget']})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--accept", type=Path, default=ROOT / "docs" / "bench" / "demo-16bit.json")
    a = ap.parse_args(argv)
    if not a.outdir.is_dir():
        raise SystemExit(f"{a.outdir}: no such folder")
    print("\n".join(report(a.outdir, a.accept)), file=sys.stdout)


if __name__ == "__main__":
    main()
