"""verify_store names the bad blob; ensure_verified hashes a store once, then trusts its marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import offspec.store.integrity as integrity
from offspec.errors import StoreError
from offspec.store.convert import convert_model
from offspec.store.integrity import VERIFIED, ensure_verified, verify_store
from offspec.store.manifest import read_manifest


@pytest.fixture
def store(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return convert_model(tiny_llama_dir, tmp_path / "store", progress=False)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_store_verifies(store):
    m = verify_store(store, progress=True)
    assert m.num_layers == 4


def test_flipped_byte_names_the_layer(store):
    m = read_manifest(store)
    entry = m.layers[3].tensors["mlp.up_proj.weight"]
    _flip_byte(store / "layers/layer_003.bin", entry.offset + 5)
    with pytest.raises(StoreError, match=r"^layer 3 \(layers/layer_003\.bin\) is corrupt: checksum mismatch"):
        verify_store(store)


def test_flipped_byte_in_padding_is_caught_too(store):
    size = (store / "layers/layer_001.bin").stat().st_size
    _flip_byte(store / "layers/layer_001.bin", size - 1)
    with pytest.raises(StoreError, match=r"layer 1 .* checksum mismatch"):
        verify_store(store)


def test_resident_blob_corruption(store):
    _flip_byte(store / "resident.bin", 0)
    with pytest.raises(StoreError, match=r"resident blob \(resident\.bin\) is corrupt"):
        verify_store(store)


def test_missing_and_short_files(store):
    layer = store / "layers/layer_002.bin"
    layer.write_bytes(layer.read_bytes()[:-1])
    with pytest.raises(StoreError, match=r"layer 2 .* truncated"):
        verify_store(store)
    layer.unlink()
    with pytest.raises(StoreError, match=r"layer 2 \(layers/layer_002\.bin\) is missing"):
        verify_store(store)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not an offspec store"):
        verify_store(tmp_path)


def test_ensure_verified_hashes_once(store, monkeypatch):
    hashed: list[str] = []
    real = integrity.file_sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(integrity, "file_sha256", counting)
    ensure_verified(store)
    blobs = [n for n in hashed if n.endswith(".bin")]
    assert len(blobs) == 5 and (store / VERIFIED).is_file()
    hashed.clear()
    ensure_verified(store)
    assert [n for n in hashed if n.endswith(".bin")] == []  # only the manifest is hashed


def test_ensure_verified_rechecks_a_changed_blob(store):
    ensure_verified(store)
    layer = store / "layers/layer_000.bin"
    _flip_byte(layer, 100)
    st = layer.stat()
    os.utime(layer, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match=r"layer 0 .* checksum mismatch"):
        ensure_verified(store)
