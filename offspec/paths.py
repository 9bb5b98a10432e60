"""Where offspec keeps what it writes: $OFFSPEC_HOME, else ~/.cache/offspec.

A shared, read-only OFFSPEC_HOME that already holds the stores works: what offspec would only add there
(pass-time curves, tree shapes, logs) goes through `home_path_for_writing`, which says so once and skips it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_warned_read_only: set[str] = set()


def offspec_home() -> Path:
    """$OFFSPEC_HOME (with ~ expanded), else ~/.cache/offspec."""
    env = os.environ.get("OFFSPEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "offspec"


def home_is_writable(home: Path | None = None) -> bool:
    """True if offspec can create files under its home (creating the home itself if needed)."""
    home = home or offspec_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(home, os.W_OK | os.X_OK)


def home_path_for_writing(*parts: str, what: str = "files") -> Path | None:
    """offspec_home()/parts with its folder created, or None (one warning line per home) if the home is read-only.

    For optional things offspec keeps (curves, tree shapes, logs): callers skip writing on None."""
    home = offspec_home()
    path = home.joinpath(*parts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.access(path.parent, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    if str(home) not in _warned_read_only:
        _warned_read_only.add(str(home))
        print(f"warning: {home} is read-only; not saving {what} there (set OFFSPEC_HOME to a writable folder "
              "to keep them)", file=sys.stderr)
    return None
