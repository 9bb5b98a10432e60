"""Formatters for the command line: the statistics line, per-pass lines, the residency plan and log tables.

They sit with the surfaces because they read the engine's statistics and the runtime's plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from offspec.console import plural, status_line
from offspec.runtime.plan import DEVICE, DISK, FIXED_OVERHEAD_BYTES, HOST, format_bytes

if TYPE_CHECKING:
    from offspec.generate import GenerationStats
    from offspec.runtime.plan import ResidencyPlan


def format_stats(stats: GenerationStats, interrupted: bool = False) -> str:
    """One line: tokens, tok/s, tokens per target pass, passes, mean pass seconds, then what applies: draft seconds,
    streamed GB/s, budget, prefill, seed, peak memory next to the plan."""
    parts = [
        plural(stats.tokens, "token"),
        f"{stats.tok_per_s:.2f} tok/s",
        f"{stats.tokens_per_pass:.2f} tokens/pass",
        f"{stats.passes} {'pass' if stats.passes == 1 else 'passes'}",
        f"{stats.target_pass_s:.3f} s/pass",
    ]
    if stats.draft_s > 0 or stats.drafter:
        parts.append(f"draft {stats.drafter + ' ' if stats.drafter else ''}{stats.draft_s:.2f} s")
    if len(stats.trees_by_drafter) > 1:
        parts.append("trees " + " ".join(f"{k} {v}" for k, v in sorted(stats.trees_by_drafter.items())))
    if stats.ahead_started:
        parts.append(f"{stats.ahead_saved_s:.2f} s more drafted during streamed passes "
                     f"({stats.ahead_used} of {stats.ahead_started} early trees used)")
    if stats.streamed_bytes > 0:
        parts.append(f"streamed {stats.streamed_gbps:.2f} GB/s, {format_bytes(stats.streamed_bytes_per_token)}/token")
    if stats.experts_routed:
        experts = (f"experts {stats.experts_read / stats.passes:.1f} read/pass, "
                   f"{100 * stats.expert_hit_rate:.0f}% cache hits")
        if stats.experts_prefetched:
            experts += f", prefetch {100 * stats.prefetch_accuracy:.0f}% used"
        parts.append(experts)
    parts.append(f"budget {stats.budget:.0f}" if stats.budget else "plain decoding")
    if stats.threads:
        parts.append(plural(stats.threads, "thread"))
    if stats.prefill_tokens:
        parts.append(f"prefill {stats.prefill_tokens} tokens in {stats.prefill_s:.2f} s")
    if stats.seed is not None:
        parts.append(f"seed {stats.seed}")
    if stats.peak_rss_bytes:
        peak = f"peak RSS {format_bytes(stats.peak_rss_bytes)}"
        if stats.peak_device_bytes:
            peak += f", peak device {format_bytes(stats.peak_device_bytes)}"
        if stats.planned_bytes and not stats.peak_device_bytes:  # CPU: the plan bounds the process's memory
            bound = stats.planned_bytes + FIXED_OVERHEAD_BYTES
            peak += (f" {'within' if stats.peak_rss_bytes <= bound else 'over'} the bound of {format_bytes(bound)} "
                     f"(memory plan {format_bytes(stats.planned_bytes)} + fixed overhead "
                     f"{format_bytes(FIXED_OVERHEAD_BYTES)})")
        elif stats.planned_bytes:
            peak += f" (the memory plan holds {format_bytes(stats.planned_bytes)} of device memory)"
        parts.append(peak)
    line = ", ".join(parts)
    return ("interrupted: " + line) if interrupted else line


def context_full_line(context_tokens: int) -> str:
    """The one line printed when an answer stops because the context (the KV cache) is full."""
    return f"warning: stopped at the context limit of {context_tokens} tokens; raise --ctx-size for more"


def format_step(ev, n: int) -> str:
    """--verbose: one line per target pass."""
    tree = f"tree {ev.tree_size}, accepted {ev.accepted}, budget {ev.budget}, " if ev.budget else ""
    return (f"pass {n}: {tree}+{len(ev.tokens)} tokens, target {ev.target_pass_s:.3f} s, "
            f"draft {ev.draft_s:.3f} s, streamed {format_bytes(ev.streamed_bytes)}")


class StepPrinter:
    """--verbose: the prefill, then one line per target pass of each answer, on stderr."""

    def __init__(self) -> None:
        self.stats, self.n = None, 0

    def __call__(self, step, stats: GenerationStats) -> None:
        if stats is not self.stats:  # a new answer
            self.stats, self.n = stats, 0
            status_line(f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_s:.3f} s")
        self.n += 1
        status_line(format_step(step, self.n))


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; [] -> '-'."""
    if not layers:
        return "-"
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def plan_table(plan: ResidencyPlan, title: str, minimum_bytes: int, device_budget_bytes: int,
               host_budget_bytes: int | None = None, draft_label: str = "draft model (resident)") -> Table:
    """The residency plan: layer ranges and bytes per tier, the ring, streamed bytes per pass, the minimum budget."""
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("part")
    table.add_column("layers")
    table.add_column("count", justify="right")
    table.add_column("bytes", justify="right")
    for tier, label in ((DEVICE, "on device" if plan.device_kind != "cpu" else "in RAM"),
                        (HOST, "pinned host RAM"), (DISK, "streamed from disk")):
        layers = plan.layers(tier)
        if tier == HOST and plan.device_kind == "cpu":
            continue
        size = sum(plan.layer_bytes[i] for i in layers)
        table.add_row(label, layer_ranges(layers), str(len(layers)), format_bytes(size))
    table.add_section()
    table.add_row("resident (embeddings, norm, head)", "", "", format_bytes(plan.resident_bytes))
    table.add_row("KV cache", "", "", format_bytes(plan.kv_bytes))
    if plan.reserved_bytes:
        table.add_row(draft_label, "", "", format_bytes(plan.reserved_bytes))
    table.add_row("staging ring", f"{plan.ring_slots} slots x {format_bytes(plan.slot_bytes)}", "",
                  format_bytes(plan.ring_bytes))
    if plan.expert_slots:
        moe = plan.moe_layers
        table.add_row("expert cache", f"{plan.expert_slots} experts resident per layer", str(len(moe)),
                      format_bytes(plan.expert_cache_bytes))
    if plan.workspace_bytes:
        table.add_row("compute workspace", f"trees up to {plan.tree_tokens} tokens", "",
                      format_bytes(plan.workspace_bytes))
    table.add_section()
    table.add_row("streamed per pass" + (" (shared parts; experts as routed)" if plan.expert_slots else ""), "", "",
                  format_bytes(plan.streamed_bytes_per_pass))
    if plan.device_kind != "cpu":
        table.add_row("copied to device per pass", "", "", format_bytes(plan.copied_bytes_per_pass))
        table.add_row("host RAM used / budget", "", "",
                      f"{format_bytes(plan.host_bytes)} / {format_bytes(host_budget_bytes or 0)}")
    table.add_row("RAM used / budget" if plan.device_kind == "cpu" else "device memory used / budget", "", "",
                  f"{format_bytes(plan.device_bytes)} / {format_bytes(device_budget_bytes)}")
    table.add_row("minimum budget", "", "", format_bytes(minimum_bytes))
    if plan.device_kind == "cpu":
        table.add_row("peak RSS at most", f"plan + {format_bytes(FIXED_OVERHEAD_BYTES)} fixed overhead", "",
                      format_bytes(plan.rss_bound_bytes))
    return table


def logs_table(conversations: list) -> Table:
    """Logged conversations: id, last update, command, model, answers, the first user message."""
    table = Table(show_header=True, header_style="bold")
    for col in ("id", "updated", "command", "model", "answers", "first message"):
        table.add_column(col, justify="right" if col == "answers" else "left", overflow="fold")
    for c in conversations:
        first = next((m["content"] for m in c.messages if m["role"] == "user"), "")
        first = " ".join(first.split())
        table.add_row(c.id, c.updated.replace("T", " ")[:19], c.command, str(c.model or "demo"), str(c.answers),
                      first if len(first) <= 60 else first[:57] + "...")
    return table
