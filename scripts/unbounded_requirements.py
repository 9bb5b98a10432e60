"""Print pyproject's requirements (core plus the named extras) without upper bounds, for `make test-latest`."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def unbounded(req: str) -> str:
    """'transformers>=5.0,<5.25' -> 'transformers>=5.0' (torch is handled by the caller)."""
    name = re.match(r"[A-Za-z0-9_.\-\[\]]+", req).group(0)
    lower = [c.strip() for c in req[len(name):].split(",") if c.strip().startswith(">=")]
    return name + (lower[0] if lower else "")


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    print(" ".join(unbounded(r) for r in reqs if not r.startswith("torch")))


if __name__ == "__main__":
    main(sys.argv[1:])
