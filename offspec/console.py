"""Terminal output: stdout carries answer text only, stderr carries status; tables, spinners, quiet libraries.

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

from rich.console import Console
from rich.table import Table

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


# ---------------------------------------------------------------------- words
def plural(n: int, word: str) -> str:
    """'1 answer', '2 answers'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
