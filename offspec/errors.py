"""The few exception types offspec raises for user-facing problems, and their one-line messages."""

from __future__ import annotations


class OffspecError(Exception):
    """A user-facing error: printed as one line, exit code 1 (no traceback unless OFFSPEC_DEBUG=1)."""

    exit_code = 1


class ConfigError(OffspecError):
    """Bad flag values, sizes or option combinations."""

    exit_code = 2


class ModelError(OffspecError):
    """Missing, unreadable, unsupported or mismatched model."""


class StoreError(ModelError):
    """A layer store that is missing, incomplete or corrupt."""


class BudgetError(OffspecError):
    """A memory budget that cannot hold what must be resident."""


class ContextError(OffspecError):
    """A prompt (or conversation) longer than the model's context."""


def format_error(exc: BaseException) -> str:
    """One line describing exc, for stderr."""
    if isinstance(exc, OffspecError):
        return f"error: {exc}"
    if isinstance(exc, MemoryError):
        return "error: out of memory; lower --device-memory or use --bits 4"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {text}" if text else f"error: {type(exc).__name__}"
