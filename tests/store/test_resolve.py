"""resolve_model: stores pass through, sources convert once into the cache, hub ids fail fast offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import offspec.store.convert as convert
import offspec.store.resolve as resolve
from offspec.errors import ConfigError, ModelError
from offspec.store.manifest import read_manifest
from offspec.paths import offspec_home
from offspec.store.cache import list_stores as list_cache
from offspec.store.resolve import resolve_model


def _count_conversions(monkeypatch) -> list[str]:
    written: list[str] = []
    real = convert.write_blob

    def wrapper(store_dir, rel, tensors):
        written.append(rel)
        return real(store_dir, rel, tensors)

    monkeypatch.setattr(convert, "write_blob", wrapper)
    return written


def test_offspec_home(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSPEC_HOME", str(tmp_path / "h"))
    assert offspec_home() == tmp_path / "h"
    monkeypatch.delenv("OFFSPEC_HOME")
    assert offspec_home() == Path.home() / ".cache" / "offspec"


def test_converts_once_and_reuses(tiny_llama_dir, tmp_path, monkeypatch):
    written = _count_conversions(monkeypatch)
    store = resolve_model(str(tiny_llama_dir), bits=16, dtype="float32", home=tmp_path, progress=False)
    assert store.parent == tmp_path / "stores"
    assert store.name.startswith(f"{tiny_llama_dir.name}-f32-") and len(store.name.split("-")[-1]) == 12
    assert len(written) == 5
    written.clear()
    assert resolve_model(str(tiny_llama_dir), bits=16, dtype="float32", home=tmp_path, progress=False) == store
    assert written == []
    other = resolve_model(str(tiny_llama_dir), bits=4, dtype="bfloat16", home=tmp_path, progress=False)
    assert other != store and read_manifest(other).bits == 4
    assert resolve_model(str(store), home=tmp_path) == store  # a store is used as is
    assert written == [f"layers/layer_{i:03d}.bin" for i in range(4)] + ["resident.bin"]


def test_home_from_environment(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSPEC_HOME", str(tmp_path / "home"))
    store = resolve_model(str(tiny_llama_dir), progress=False)
    assert store.parent == tmp_path / "home" / "stores"


def test_list_cache(tiny_llama_dir, tiny_llama_draft_dir, tmp_path):
    assert list_cache(tmp_path) == []
    a = resolve_model(str(tiny_llama_dir), home=tmp_path, progress=False)
    b = resolve_model(str(tiny_llama_draft_dir), bits=4, home=tmp_path, progress=False)
    (tmp_path / "stores" / "junk.partial").mkdir()
    rows = {r["path"]: r for r in list_cache(tmp_path)}
    assert set(rows) == {str(a), str(b)}
    assert rows[str(a)]["layers"] == 4 and rows[str(b)]["layers"] == 2
    assert rows[str(b)]["bits"] == 4 and rows[str(a)]["dtype"] == "bfloat16"
    assert rows[str(a)]["source"] == str(tiny_llama_dir.resolve())
    assert rows[str(a)]["size_bytes"] > sum(x.size for x in read_manifest(a).layers)


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="model path not found: ./nope/here/too"):
        resolve_model("./nope/here/too", home=tmp_path)
    with pytest.raises(ModelError, match="model path not found"):
        resolve_model(str(tmp_path / "absent"), home=tmp_path)


def test_bad_options(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError):
        resolve_model(str(tiny_llama_dir), bits=3, home=tmp_path)


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(resolve, "hub_reachable", lambda *a: pytest.fail("no network probe when offline"))
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="not a local path and the hub cannot be reached"):
        resolve_model("offspec-test/definitely-not-cached-model", home=tmp_path)
    assert time.monotonic() - t0 < 5


def test_hub_id_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(resolve, "hub_reachable", lambda *a: False)
    with pytest.raises(ModelError, match="offline"):
        resolve_model("offspec-test/definitely-not-cached-model", home=tmp_path)


def test_hub_reachable_times_out_quickly(monkeypatch):
    monkeypatch.setattr(resolve, "HUB_HOST", ("192.0.2.1", 443))  # TEST-NET-1: never answers
    t0 = time.monotonic()
    assert resolve.hub_reachable(timeout_s=0.5) is False
    assert time.monotonic() - t0 < 3
