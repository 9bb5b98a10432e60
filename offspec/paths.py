"""Where offspec keeps what it writes: $OFFSPEC_HOME, else ~/.cache/offspec."""

from __future__ import annotations

import os
from pathlib import Path


def offspec_home() -> Path:
    """$OFFSPEC_HOME (with ~ expanded), else ~/.cache/offspec."""
    env = os.environ.get("OFFSPEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offspec"
