"""Terminal output: stdout carries answer text only, stderr carries status; formatters for stats, plans and caches.

Nothing here imports torch: `offspec --help` stays fast. Both consoles look up sys.stdout / sys.stderr
when they write, so test runners that swap the streams see the output.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from offspec.runtime.plan import DEVICE, DISK, HOST, format_bytes

if TYPE_CHECKING:
    from offspec.generate import GenerationStats
    from offspec.runtime.plan import ResidencyPlan

out = Console(highlight=False, soft_wrap=True)  # results (tables, paths) on stdout
err = Console(stderr=True, highlight=False, soft_wrap=True)  # status, stats, errors on stderr


def write_text(piece: str) -> None:
    """Append a piece of answer text to stdout as-is (no markup, no wrapping) and flush it now."""
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()


def stdin_is_tty() -> bool:
    return _isatty(sys.stdin)


def stderr_is_tty() -> bool:
    return _isatty(sys.stderr)


def stdout_is_tty() -> bool:
    return _isatty(sys.stdout)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def error_line(message: str) -> None:
    """Print exactly one line on stderr (newlines inside message are folded)."""
    line = " ".join(str(message).split("\n"))
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


def status_line(message: str) -> None:
    """A dim status line on stderr (plain text when stderr is not a terminal)."""
    err.print(message, style="dim", markup=False)


@contextlib.contextmanager
def phase(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr while a slow step runs (only on a terminal)."""
    if not (enabled and stderr_is_tty()):
        yield
        return
    with err.status(message, spinner="dots"):
        yield


def print_table(table: Table) -> None:
    """A table on stdout; off a terminal it keeps its natural width instead of wrapping at 80 columns."""
    if stdout_is_tty():
        out.print(table)
        return
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), table).maximum
    Console(file=sys.stdout, width=max(width, 40), highlight=False).print(table)


# ---------------------------------------------------------------------- formatters
def format_stats(stats: GenerationStats, interrupted: bool = False) -> str:
    """One line: tokens, tok/s, tokens per target pass, passes, mean pass seconds, draft seconds, GB/s, budget."""
    budget = f"budget {stats.budget:.0f}" if stats.budget else "plain decoding"
    parts = [
        f"{stats.tokens} tokens",
        f"{stats.tok_per_s:.2f} tok/s",
        f"{stats.tokens_per_pass:.2f} tokens/pass",
        f"{stats.passes} passes",
        f"{stats.target_pass_s:.3f} s/pass",
        f"draft {stats.draft_s:.2f} s",
        f"streamed {stats.streamed_gbps:.2f} GB/s",
        budget,
    ]
    if stats.prefill_tokens:
        parts.append(f"prefill {stats.prefill_tokens} tokens in {stats.prefill_s:.2f} s")
    line = ", ".join(parts)
    return ("interrupted: " + line) if interrupted else line


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
               host_budget_bytes: int | None = None) -> Table:
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
        table.add_row("draft model (resident)", "", "", format_bytes(plan.reserved_bytes))
    table.add_row("staging ring", f"{plan.ring_slots} slots x {format_bytes(plan.slot_bytes)}", "",
                  format_bytes(plan.ring_bytes))
    table.add_section()
    table.add_row("streamed per pass", "", "", format_bytes(plan.streamed_bytes_per_pass))
    if plan.device_kind != "cpu":
        table.add_row("copied to device per pass", "", "", format_bytes(plan.copied_bytes_per_pass))
        table.add_row("host RAM used / budget", "", "",
                      f"{format_bytes(plan.host_bytes)} / {format_bytes(host_budget_bytes or 0)}")
    table.add_row("RAM used / budget" if plan.device_kind == "cpu" else "device memory used / budget", "", "",
                  f"{format_bytes(plan.device_bytes)} / {format_bytes(device_budget_bytes)}")
    table.add_row("minimum budget", "", "", format_bytes(minimum_bytes))
    return table


def models_table(rows: list[dict]) -> Table:
    """The store cache: name, source, bits, dtype, size."""
    table = Table(show_header=True, header_style="bold")
    for col in ("name", "source", "bits", "dtype", "size"):
        table.add_column(col, justify="right" if col in ("bits", "size") else "left", overflow="fold")
    for r in rows:
        size = r.get("size_bytes", r.get("size"))
        shown = format_bytes(size) if isinstance(size, (int, float)) else str(size or "")
        table.add_row(str(r.get("name", "")), str(r.get("source", "")), str(r.get("bits", "")),
                      str(r.get("dtype", "")), shown)
    return table
