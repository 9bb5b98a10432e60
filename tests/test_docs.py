"""The user docs stand alone: they point at nothing a user does not have and speak of nothing but offspec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# a path outside the repository, or words about how the docs were written rather than about offspec
FORBIDDEN = [r"\.\./shared", r"/work/", r"\bthis session\b", r"\bhelpers?\b"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_point_at_nothing_outside_the_repository(doc: Path):
    text = doc.read_text(encoding="utf-8")
    for pattern in FORBIDDEN:
        hits = [m.group(0) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
        assert not hits, f"{doc.name}: {hits}"
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):  # relative links resolve inside the repository
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: broken link {target}"


def test_readme_states_the_default_memory_budget_the_code_uses(monkeypatch):
    """The README's default budget (share of the free RAM without --device-memory) is the one the runtime takes."""
    import psutil
    import torch

    from offspec.runtime.memory import default_budgets

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    m = re.search(r"Without `--device-memory`.*?budgets (\d+)% of the free RAM", text)
    assert m, "the README should say what offspec does without --device-memory"

    class VM:
        available = 10_000_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    device_budget, _ = default_budgets(torch.device("cpu"))
    assert device_budget == int(VM.available * int(m.group(1)) / 100)
