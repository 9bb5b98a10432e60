"""Layers point one way: no module of offspec imports from a layer above its own.

store -> models -> runtime -> speculative -> engine (generate, loader) -> surfaces (cli, chat, bench, peers).
The bottom modules (errors, config, paths, console, transformers_contract) may be imported by all, and
import nothing above them. Every import counts, at module level or inside a function, read with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "offspec"

BOTTOM = {"errors", "config", "paths", "console", "transformers_contract"}
PACKAGES = {"store": 1, "models": 2, "runtime": 3, "speculative": 4}
ENGINE = {"generate", "loader", "batch", "scheduler"}
SURFACES = {"cli", "chat", "chat_terminal", "conversations", "bench", "bench_report", "peers", "server", "openai_api",
            "__main__"}
RANK_NAMES = {0: "bottom", 1: "store", 2: "models", 3: "runtime", 4: "speculative", 5: "engine", 6: "surfaces"}

# Known upward imports, to be removed (this list may only shrink): (importer, imported) -> why it is here.
KNOWN: dict[tuple[str, str], str] = {
}


def layer_of(module: str) -> int:
    """The rank of a module `offspec.x[.y]`; a module with no layer is an error (give it one above)."""
    parts = module.split(".")
    assert parts[0] == "offspec", module
    if len(parts) == 1:
        return 0  # the package itself: its version string
    head = parts[1]
    if head in BOTTOM:
        return 0
    if head in PACKAGES:
        return PACKAGES[head]
    if head in ENGINE:
        return 5
    if head in SURFACES:
        return 6
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py (and docs/architecture.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    p = ROOT.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every offspec module imported anywhere in the file (relative imports resolved; `from offspec import x`
    counts as offspec.x when x is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "offspec"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "offspec":
                continue
            for a in node.names:
                out.add(f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod)
    return out


def upward_imports() -> dict[tuple[str, str], tuple[str, str]]:
    """(importer, imported) -> (importer's layer, imported's layer) for every import that points up."""
    bad = {}
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        for dep in imports_of(path):
            theirs = layer_of(dep)
            if theirs > mine:
                bad[(me, dep)] = (RANK_NAMES[mine], RANK_NAMES[theirs])
    return bad


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


def test_no_module_imports_from_a_layer_above_it():
    bad = upward_imports()
    new = {k: v for k, v in bad.items() if k not in KNOWN}
    assert not new, "imports from a layer above: " + "; ".join(
        f"{a} ({la}) imports {b} ({lb})" for (a, b), (la, lb) in sorted(new.items()))


def test_the_known_exceptions_still_exist():
    """When one is fixed, drop it from KNOWN so it cannot come back."""
    gone = set(KNOWN) - set(upward_imports())
    assert not gone, f"fixed, remove from KNOWN: {sorted(gone)}"


@pytest.mark.parametrize("source,expected", [
    ("from offspec.generate import Engine", {"offspec.generate"}),
    ("def f():\n    import offspec.cli\n", {"offspec.cli"}),
    ("from offspec import bench", {"offspec.bench"}),
    ("from . import tree", {"offspec.speculative.tree"}),
    ("from ..runtime.masks import tree_mask", {"offspec.runtime.masks"}),
    ("import torch", set()),
])
def test_imports_are_found_wherever_they_are(tmp_path: Path, monkeypatch, source, expected):
    """The scanner itself: function-level and relative imports count (checked on a file placed in the tree)."""
    import sys

    me = sys.modules[__name__]
    fake_root = tmp_path / "offspec"
    for pkg in ("speculative", "runtime"):
        (fake_root / pkg).mkdir(parents=True)
        (fake_root / pkg / "__init__.py").write_text("")
    (fake_root / "__init__.py").write_text("")
    for mod in ("generate.py", "cli.py", "bench.py", "speculative/tree.py", "runtime/masks.py"):
        (fake_root / mod).write_text("")
    f = fake_root / "speculative" / "probe.py"
    f.write_text(source)
    monkeypatch.setattr(me, "ROOT", fake_root)
    assert me.imports_of(f) == expected
