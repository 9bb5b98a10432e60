"""Reporting for `offspec bench`: the summary lines, the tables, the "limit" legend, JSON and the plot.

Everything here reads the dict `offspec.bench.run_bench` returns and measures nothing. Output paths are
checked before the run (`check_output_paths`), so a bad --json or --plot fails in one line, not after
an hour of measuring.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from offspec.errors import ConfigError

LIMIT_FLAG = "!"  # marks a figure above its ceiling: a measurement problem, not a speed


def _fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def _config_name(r: dict) -> str:
    if r["config"] == "plain":
        return "plain"
    name = f"auto ~{r['mean_budget']:.0f}" if r["config"] == "auto" else f"budget {r['config']}"
    return f"{r['drafter']} {name}" if r.get("drafter") else name


# ---------------------------------------------------------------------- output paths
def check_output_paths(json_path: str | None, plot_path: str | None) -> None:
    """Fail before the run, in one line, if --json or --plot cannot be written where asked."""
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if not path:
            continue
        p = Path(path).expanduser()
        if p.is_dir():
            raise ConfigError(f"{flag} {path}: is a folder; give a file name")
        if not p.parent.is_dir():
            raise ConfigError(f"{flag} {path}: the folder {p.parent} does not exist (create it first)")
        if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise ConfigError(f"{flag} {path}: not writable")
    if plot_path:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'offspec[plot]'") from None
        ext = Path(plot_path).suffix.lower().lstrip(".")
        kinds = Figure().canvas.get_supported_filetypes()
        if ext and ext not in kinds:
            raise ConfigError(f"--plot {plot_path}: matplotlib cannot write .{ext} (use one of: {', '.join(sorted(kinds))})")


# ---------------------------------------------------------------------- tables
def _pct(r: dict) -> str:
    if r.get("limit_fraction") is None:
        return "-"
    flag = f" {LIMIT_FLAG}" if r["limit_fraction"] > 1 else ""
    return f"{r['limit_fraction'] * 100:.0f}%{flag}"


def _gbps(r: dict) -> str:
    flag = f" {LIMIT_FLAG}" if r.get("gbps_over_ceiling") else ""
    return _fmt(r["streamed_gbps"]) + flag


def results_table(result: dict):
    """One row per configuration (and the peer): prefill and generation tok/s, tokens/pass, pass and draft
    time, GB/s, the limit and the fraction of it reached, speed-ups."""
    from rich import box
    from rich.table import Table

    table = Table(title="throughput: prefill (pp) and generation (tg) apart; tg excludes the prefill",
                  title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    for col in ("config", "pp tok/s", "tg tok/s", "tok/pass", "pass s", "draft s", "GB/s", "limit", "%limit",
                "x plain", "x peer"):
        table.add_column(col, justify="left" if col == "config" else "right", no_wrap=True)
    for r in result.get("configs", []):
        table.add_row(_config_name(r), _fmt(r.get("prefill_tok_per_s"), ".1f"), _fmt(r["tok_per_s"]),
                      _fmt(r["tokens_per_pass"]), _fmt(r["pass_s"], ".3f"), _fmt(r["draft_s_per_pass"], ".3f"),
                      _gbps(r), _fmt(r["limit_tok_per_s"]), _pct(r), _fmt(r["speedup_vs_plain"], ".2f", "x"),
                      _fmt(r["speedup_vs_peer"], ".2f", "x"))
    peer = result.get("peer")
    if peer:
        table.add_section()
        table.add_row(f"peer {peer['name']}", "-", _fmt(peer["tok_per_s"]), "1.00", _fmt(peer["s_per_token"], ".3f"),
                      "-", "-", "-", "-", "-", "1.00x")
    return table


def kinds_table(result: dict):
    """tg tok/s, tokens per pass and speed-up over plain decoding, split by prompt kind."""
    from rich import box
    from rich.table import Table

    kinds = sorted({k for r in result.get("configs", []) for k in r["by_kind"]})
    table = Table(title="by prompt kind (tg tok/s, tok/pass, x plain)", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD)
    table.add_column("config", no_wrap=True)
    for k in kinds:
        table.add_column(k, justify="right", no_wrap=True)
    for r in result.get("configs", []):
        cells = []
        for k in kinds:
            f = r["by_kind"].get(k)
            cells.append(f"{_fmt(f['tok_per_s'])}  {_fmt(f['tokens_per_pass'])}  {_fmt(f['speedup_vs_plain'], '.2f', 'x')}"
                         if f else "-")
        table.add_row(_config_name(r), *cells)
    peer = result.get("peer")
    if peer:
        table.add_section()
        table.add_row(f"peer {peer['name']}", *[_fmt(peer["by_kind"].get(k, {}).get("tok_per_s")) for k in kinds])
    return table


def limit_legend(result: dict) -> str | None:
    """One line that says what "limit" means in this run (None when nothing streams)."""
    read = result.get("read") or {}
    ceiling = read.get("ceiling") or {}
    if not read.get("gbps_for_limit"):
        return None
    kind = "cold" if ceiling.get("cold", True) else "warm"
    return (f"limit = tok/pass x best raw {kind} read ({_fmt(read['gbps_for_limit'])} GB/s, of "
            f"{len(ceiling.get('gbps_runs', []))} through the run) / bytes streamed per pass; above 100% "
            f"({LIMIT_FLAG}) is a measurement problem, not a speed")


def summary_lines(result: dict) -> list[str]:
    """Plan, the read ceiling and its spread, the pass-time curve and the peer, in a few lines."""
    from offspec.runtime.plan import format_bytes

    plan, read = result["plan"], result["read"]
    lines = [
        f"plan: {len(plan['layers']['device'])} layers in memory, {len(plan['layers']['host'])} pinned, "
        f"{len(plan['layers']['disk'])} streamed; {format_bytes(plan['streamed_bytes_per_pass'])} streamed per pass",
    ]
    c = read.get("ceiling") or {}
    if c.get("gbps_runs"):
        lines.append(
            f"raw {'cold' if c['cold'] else 'warm'} read of the streamed layers, {len(c['gbps_runs'])} runs interleaved "
            f"with the passes: median {_fmt(c['gbps_median'])} GB/s, min {_fmt(c['gbps_min'])}, max "
            f"{_fmt(c['gbps_best'])} (spread {_fmt(c['spread'], '.1f', 'x')})")
    store = read.get("store") or {}
    if store.get("gbps_runs"):
        lines.append(f"raw cold read of the whole store ({format_bytes(store['bytes'])}): median "
                     f"{_fmt(store['gbps_median'])} GB/s, best {_fmt(store['gbps_best'])}")
    if result.get("curve"):
        lines.append("target pass: " + ", ".join(f"{c['tokens']} tok {c['pass_s_median']:.3f} s"
                                                  for c in result["curve"]))
    for d in result.get("draft_forward", []):
        lines.append(f"draft {d['drafter']} forward per tree level ({format_bytes(d['weight_bytes'])} of weights read, "
                     f"{d['read_s'] * 1e3:.0f} ms at {_fmt(d['ram_read_gbps'], '.1f')} GB/s from RAM): "
                     + ", ".join(f"{lv['rows']} rows {lv['forward_s'] * 1e3:.0f} ms ({_fmt(lv['x_read'], '.1f', 'x')})"
                                 for lv in d["levels"]))
    peaks = [(r["peak_rss_bytes"], r["planned_bytes"]) for c in result.get("configs", []) for r in c.get("records", [])
             if r.get("peak_rss_bytes")]
    if peaks:
        from offspec.runtime.plan import FIXED_OVERHEAD_BYTES

        peak, planned = max(p for p, _ in peaks), max(q for _, q in peaks)
        lines.append(f"peak RSS {format_bytes(peak)} against the bound of {format_bytes(planned + FIXED_OVERHEAD_BYTES)} "
                     f"(memory plan {format_bytes(planned)} + fixed overhead {format_bytes(FIXED_OVERHEAD_BYTES)})")
    if result.get("peer"):
        p = result["peer"]
        lines.append(f"peer {p['name']}: {p['tok_per_s']:.3f} tok/s ({p['s_per_token']:.2f} s/token) "
                     f"under {format_bytes(p['budget_bytes'])}, device map {p['device_map']}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    for r in result.get("configs", []):  # a mixture of experts: reads and the expert cache per configuration
        if r.get("experts_read_per_pass") or r.get("expert_hit_rate"):
            lines.append(f"experts, {_config_name(r)}: {_fmt(r['experts_read_per_pass'], '.1f')} read per pass, "
                         f"{_fmt(100 * r['expert_hit_rate'], '.0f')}% cache hits, "
                         f"{format_bytes(r.get('streamed_bytes_per_token') or 0)} streamed per token")
    return lines


# ---------------------------------------------------------------------- files
def write_json(result: dict, path: str | Path) -> None:
    Path(path).expanduser().write_text(json.dumps(result, indent=1, default=str) + "\n")


def write_plot(result: dict, path: str | Path) -> None:
    """Two panels against budget: tok/s and tokens per pass; plain decoding and the peer as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'offspec[plot]'") from None
    rows = result.get("configs", [])
    spec = [r for r in rows if r["spec"]]
    fixed = sorted((r for r in spec if r["budget"] is not None), key=lambda r: r["budget"])
    auto = next((r for r in spec if r["config"] == "auto"), None)
    plain = next((r for r in rows if r["config"] == "plain"), None)
    peer = result.get("peer")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((ax1, "tok_per_s", "generated tokens / s"), (ax2, "tokens_per_pass", "tokens per target pass")):
        if fixed:
            ax.plot([r["budget"] for r in fixed], [r[key] for r in fixed], "o-", label="speculative (fixed budget)")
        if auto is not None:
            ax.plot([max(auto["mean_budget"], 1)], [auto[key]], "r*", markersize=12,
                    label=f"auto (mean budget {auto['mean_budget']:.0f})")
        if plain is not None:
            ax.axhline(plain[key], color="gray", linestyle="--", label="plain streamed decoding")
        if peer and key == "tok_per_s":
            ax.axhline(peer["tok_per_s"], color="black", linestyle=":", label=f"peer ({peer['name']})")
        if fixed or auto:
            ax.set_xscale("log", base=2)
            ticks = sorted({r["budget"] for r in fixed})
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("tree budget (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    m = result.get("machine", {})
    fig.suptitle(f"offspec bench: {Path(result['plan']['target_store']).name} on {m.get('cpu', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(path).expanduser(), dpi=110)
    plt.close(fig)
