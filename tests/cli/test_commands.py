"""convert, plan, verify, models, bench pass-through, --help / --version, and one end-to-end run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

COMMANDS = ["generate", "chat", "convert", "plan", "verify", "models", "bench"]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_everywhere_with_examples(runner, cli_app, flag):
    top = runner.invoke(cli_app, [flag])
    assert top.exit_code == 0 and all(c in top.stdout for c in COMMANDS)
    for cmd in COMMANDS:
        res = runner.invoke(cli_app, [cmd, flag])
        assert res.exit_code == 0, res.output
        assert "Examples" in res.stdout and f"offspec {cmd}" in res.stdout


def test_version(runner, cli_app):
    from offspec import __version__

    res = runner.invoke(cli_app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"offspec {__version__}"


def test_convert_verify_and_models(runner, cli_app, tiny, tmp_path):
    out = tmp_path / "store"
    res = runner.invoke(cli_app, ["convert", str(tiny.draft), str(out), "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert Path(res.stdout.strip()) == out and (out / "manifest.json").is_file()
    ok = runner.invoke(cli_app, ["verify", str(out)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok:") and ok.stderr == ""
    # A flipped byte in layer 1: verify names the layer and fails.
    blob = sorted((out / "layers").iterdir())[1]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad = runner.invoke(cli_app, ["verify", str(out)])
    assert bad.exit_code != 0 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and "layer 1" in bad.stderr and "corrupt" in bad.stderr
    # models lists what earlier tests converted into OFFSPEC_HOME (at least this target).
    from offspec.store.resolve import resolve_model

    resolve_model(str(tiny.target), progress=False)
    listed = runner.invoke(cli_app, ["models", "--json"])
    assert listed.exit_code == 0
    rows = json.loads(listed.stdout)
    assert any(r.get("source") == str(tiny.target) and r.get("bits") == 16 for r in rows)
    table = runner.invoke(cli_app, ["models"])
    assert table.exit_code == 0 and "target-bf16-" in table.stdout


def test_models_on_an_empty_cache(runner, cli_app, tmp_path):
    res = runner.invoke(cli_app, ["models"], env={"OFFSPEC_HOME": str(tmp_path / "empty")})
    assert res.exit_code == 0 and res.stdout == "" and "nothing kept in" in res.stderr


def test_plan_table_streams_what_does_not_fit(runner, cli_app, tiny, monkeypatch):
    from offspec.runtime.plan import format_bytes

    roomy = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "1GiB", "--device", "cpu"])
    assert roomy.exit_code == 0, roomy.output
    assert "0-3" in roomy.stdout and "minimum budget" in roomy.stdout and "Llama" in roomy.stdout  # its family
    # Just above the minimum (KV for the context + resident + 2 layer slots): layers stream from disk.
    from offspec.runtime.sizing import context_tokens, plan_for_store
    from offspec.store.manifest import read_manifest
    from offspec.store.resolve import resolve_model

    store = resolve_model(str(tiny.target), 16, "bfloat16", progress=False)
    ctx = context_tokens(store, 4096)
    assert ctx == 512  # --ctx-size 4096 capped at the tiny model's context
    _, minimum = plan_for_store(store, read_manifest(store), "cpu", 1 << 40, 0, 0, ctx)
    tight = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", str(minimum + 1000), "--device", "cpu"])
    assert tight.exit_code == 0, tight.output
    assert "streamed from disk" in tight.stdout and "ring" in tight.stdout
    assert format_bytes(0) not in tight.stdout.split("streamed per pass")[1].splitlines()[0]
    with_draft = runner.invoke(cli_app, ["plan", str(tiny.target), "--draft", str(tiny.draft), "--device-memory",
                                         "1GiB", "--device", "cpu"])
    assert with_draft.exit_code == 0 and "draft model" in with_draft.stdout
    from offspec.paths import offspec_home

    def nf4_stores() -> list[str]:
        return sorted(p.name for p in (offspec_home() / "stores").glob("*nf4*"))

    before = nf4_stores()
    self_draft = runner.invoke(cli_app, ["plan", str(tiny.target), "--draft", "self", "--device-memory", "1GiB",
                                         "--device", "cpu"])
    from offspec.runtime.self_draft import default_self_format
    from offspec.runtime.sizing import self_draft_bytes

    fmt = default_self_format()
    assert self_draft.exit_code == 0 and f"self-draft: {fmt} copy" in self_draft.stdout
    from offspec.cli import CTX_TOKENS
    from offspec.runtime.sizing import context_tokens

    ctx = context_tokens(store, CTX_TOKENS)
    assert format_bytes(self_draft_bytes(store, read_manifest(store), ctx, "cpu", fmt=fmt)) in self_draft.stdout
    assert nf4_stores() == before  # sized from the manifest, not built
    too_small = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "1KiB", "--device", "cpu"])
    assert too_small.exit_code != 0 and "minimum" in too_small.stderr and too_small.stdout == ""


def test_bench_passes_its_options_through(runner, cli_app, monkeypatch, tmp_path):
    seen: dict = {}
    fake = types.ModuleType("offspec.bench")
    fake.bench_command = lambda **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "offspec.bench", fake)
    import offspec

    monkeypatch.setattr(offspec, "bench", fake, raising=False)
    res = runner.invoke(cli_app, ["bench", "--budgets", "auto,8", "--repeats", "2", "--json", str(tmp_path / "b.json"),
                                  "--plot", str(tmp_path / "b.png"), "--peer", "accelerate", "--device-memory", "1GiB",
                                  "--no-spec", "--warm"])
    assert res.exit_code == 0, res.output
    assert seen == {
        "model": None, "draft": None, "bits": None, "dtype": "bfloat16", "device": "auto", "device_memory": "1GiB",
        "host_memory": None, "warm": True, "budgets": "auto,8", "prompts": None, "max_new_tokens": 64, "repeats": 2,
        "peer": "accelerate", "json_path": str(tmp_path / "b.json"), "plot_path": str(tmp_path / "b.png"),
        "no_spec": True,
        "temperature": 0.0, "drafters": None,
    }


def test_end_to_end_in_a_subprocess(tiny, tmp_path):
    """The installed entry point: answer alone on stdout, one stats line on stderr (no import noise); a home of its
    own, so the only other lines are its own conversions."""
    env = {**os.environ, "OFFSPEC_HOME": str(tmp_path / "home")}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the CLI must quiet transformers by itself
    cmd = [sys.executable, "-m", "offspec", "generate", "Hello", "--model", str(tiny.target), "--draft",
           str(tiny.draft), "--budget", "4", "-n", "4", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and len(proc.stdout) > 1
    *before, last = proc.stderr.splitlines()
    assert "tok/s" in last and all(line.startswith("converted ") for line in before), proc.stderr
    err = subprocess.run([sys.executable, "-m", "offspec", "generate", "hi", "--device-memory", "x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert err.returncode == 2 and err.stdout == "" and err.stderr.count("\n") == 1


def test_help_does_not_import_torch():
    code = "import sys, offspec.cli; sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_device_memory_relative_to_the_minimum(runner, cli_app, tiny):
    res = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "min", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "streamed from disk" in res.stdout
    bad = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "min+lots", "--device", "cpu"])
    assert bad.exit_code != 0 and "bad size" in bad.stderr
