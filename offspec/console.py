"""Terminal output: stdout carries answer text only, stderr carries status; formatters for stats, plans and caches.

Nothing here imports torch: `offspec --help` stays fast. Both consoles look up sys.stdout / sys.stderr
when they write, so test runners that swap the streams see the output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
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


def quiet_libraries() -> None:
    """Keep transformers / bitsandbytes import chatter off the user's screen (call before they are imported)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
    # "Failed to load CPU gemm_4bit_forward from kernels-community" is logged at import and is harmless.
    for name in ("bitsandbytes", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in (r"bitsandbytes(\..*)?", r"transformers(\..*)?", r"torch(\..*)?", r"accelerate(\..*)?"):
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=module)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' (and accelerate's) info logging and loading bars inside the block, restored after.

    transformers may have been imported before offspec (tests, notebooks), so the env vars of
    `quiet_libraries` are not enough on their own.
    """
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    acc = logging.getLogger("accelerate")
    acc_level = acc.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    acc.setLevel(logging.ERROR)  # e.g. "Some parameters are on the meta device ..." when a peer offloads
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        acc.setLevel(acc_level)
        if bars:
            hf_logging.enable_progress_bar()


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
def plural(n: int, word: str) -> str:
    """'1 answer', '2 answers'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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
    if stats.streamed_bytes > 0:
        parts.append(f"streamed {stats.streamed_gbps:.2f} GB/s")
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
        if stats.planned_bytes:
            peak += f" (the memory plan holds {format_bytes(stats.planned_bytes)}: weights, KV cache and buffers only)"
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
