"""Conversion limits: memory stays near one layer whatever the model size, a full disk fails before writing,
Ctrl-C says how to resume, a read-only cache that holds the store works."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import offspec.store.convert as convert_mod
from offspec.errors import StoreError
from offspec.store.convert import ConversionInterrupted, convert
from offspec.store.manifest import read_manifest

from ._gguf import tiny_hf_model, write_gguf

_CHILD = """
import sys
from offspec.store.convert import convert
with open("/proc/self/status") as f:  # RssAnon once imported: the baseline the conversion adds to
    print(next(line.split()[1] for line in f if line.startswith("RssAnon:")), flush=True)
convert(sys.argv[1], sys.argv[2], bits=16, dtype="bfloat16", progress=False)
"""


def _rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _peak_rss_anon(src: Path, out: Path) -> int:
    """Peak RssAnon (bytes) of a subprocess converting src, sampled every few milliseconds, above its RssAnon once
    its imports are done (interpreter and library memory differ a few MB from run to run)."""
    # as a user runs `offspec convert`: without the Makefile's malloc settings (they keep freed heap mapped)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out)], env=env, stdout=subprocess.PIPE,
                            text=True)
    baseline = int(proc.stdout.readline() or 0)
    peak = baseline
    while proc.poll() is None:
        try:
            peak = max(peak, _rss_anon_kb(proc.pid))
        except (OSError, ValueError):
            pass
        time.sleep(0.003)
    proc.stdout.close()
    assert proc.returncode == 0
    return (peak - baseline) * 1024


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    # layers large enough that per-tensor bookkeeping (a few KB a tensor) is small beside one layer's bytes
    small = write_gguf(tiny_hf_model("llama", num_layers=4, hidden=768), tmp_path / "small.gguf", "F16")
    big = write_gguf(tiny_hf_model("llama", num_layers=32, hidden=768), tmp_path / "big.gguf", "F16")
    assert big.stat().st_size > 6 * small.stat().st_size  # the weights differ by 8x (the tokenizer is shared)
    peak_small = _peak_rss_anon(small, tmp_path / "s")
    peak_big = _peak_rss_anon(big, tmp_path / "b")
    layer = max(read_manifest(tmp_path / "b").layer_bytes)
    weights = sum(read_manifest(tmp_path / "b").layer_bytes) - sum(read_manifest(tmp_path / "s").layer_bytes)
    assert peak_big - peak_small < layer, (peak_small, peak_big, layer, weights)


def test_not_enough_disk_space_is_one_line_and_leaves_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "free_bytes", lambda path: 10_000)
    out = tmp_path / "store"
    with pytest.raises(StoreError) as err:
        convert(tiny_llama_dir, out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "not enough disk space" in msg and "needs" in msg and "10.00 KB free" in msg
    assert not out.exists() and not (tmp_path / "store.partial").exists()


def test_disk_full_midway_removes_the_partial_folder(tiny_llama_dir, tmp_path, monkeypatch):
    real = convert_mod.write_blob
    calls = []

    def full(store_dir, rel, tensors):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(store_dir, rel, tensors)

    monkeypatch.setattr(convert_mod, "write_blob", full)
    with pytest.raises(StoreError, match="the disk filled up"):
        convert(tiny_llama_dir, tmp_path / "store", progress=False)
    assert not (tmp_path / "store.partial").exists()


def test_interrupt_says_what_was_done_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    real = convert_mod.write_blob
    calls = []

    def interrupted(store_dir, rel, tensors):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rel)
        return real(store_dir, rel, tensors)

    with monkeypatch.context() as mp:
        mp.setattr(convert_mod, "write_blob", interrupted)
        with pytest.raises(ConversionInterrupted) as err:
            convert(tiny_llama_dir, tmp_path / "store", progress=False)
    assert "2 of 4 layers" in str(err.value) and "again to resume" in str(err.value)
    assert convert(tiny_llama_dir, tmp_path / "store", progress=False).converted


def test_conversion_holds_a_lock_in_one_folder_and_removes_it(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSPEC_HOME", str(tmp_path / "home"))
    seen = []
    real = convert_mod.write_blob

    def spy(store_dir, rel, tensors):
        seen.append(sorted(p.name for p in (tmp_path / "home" / "locks").iterdir()))
        return real(store_dir, rel, tensors)

    monkeypatch.setattr(convert_mod, "write_blob", spy)
    out = tmp_path / "elsewhere" / "store"
    convert(tiny_llama_dir, out, progress=False)
    assert seen[0] and seen[0][0].startswith("store-") and seen[0][0].endswith(".lock")
    assert list((tmp_path / "home" / "locks").iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["store"]  # no hidden lock beside OUT


def test_read_only_home_with_the_store_works(tiny_llama_dir, tmp_path, monkeypatch):
    """A shared cache mounted read-only (simulated: tests may run as root, who can write anywhere)."""
    from offspec import paths
    from offspec.store.resolve import resolve_model

    home = tmp_path / "home"
    monkeypatch.setenv("OFFSPEC_HOME", str(home))
    store = resolve_model(str(tiny_llama_dir), progress=False)
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p).startswith(str(home)) and mode & os.W_OK
                        else real_access(p, mode))
    real_mkdir = Path.mkdir

    def no_mkdir(self, *a, **k):
        if str(self).startswith(str(home)) and not self.exists():
            raise OSError(30, "Read-only file system")
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    assert resolve_model(str(tiny_llama_dir), progress=False) == store
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before
    with pytest.raises(StoreError, match="read-only"):
        resolve_model(str(tiny_llama_dir), bits=4, progress=False)
    assert paths.home_path_for_writing("curves", "x.json") is None


def test_home_path_for_writing_warns_once(tmp_path, monkeypatch, capsys):
    from offspec import paths

    home = tmp_path / "ro"
    monkeypatch.setenv("OFFSPEC_HOME", str(home))
    assert paths.home_path_for_writing("curves", "a.json") == home / "curves" / "a.json"
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False)
    assert paths.home_path_for_writing("curves", "a.json", what="curves") is None
    assert paths.home_path_for_writing("logs", "b.log") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only" in err
