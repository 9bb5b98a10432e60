"""Store integrity: recompute every blob's sha256, once per store, and name the first bad blob."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from offspec.errors import StoreError
from offspec.store.manifest import MANIFEST, BlobEntry, Manifest, read_manifest

VERIFIED = ".verified"  # marker: manifest sha256 + blob sizes and mtimes at the last full check
_CHUNK = 8 << 20


def _blobs(m: Manifest) -> list[tuple[str, BlobEntry]]:
    """(description, entry) for every blob, layers first, then the resident blob."""
    named = [(f"layer {i} ({b.file})", b) for i, b in enumerate(m.layers)]
    named += [(f"expert {e} of layer {i} ({b.file})", b) for i in range(m.num_layers)
              for e, b in enumerate(m.layer_experts(i))]
    return named + [(f"resident blob ({m.resident.file})", m.resident)]


def _check_shape(store: Path, what: str, blob: BlobEntry) -> Path:
    """The blob's path; StoreError if it is missing, has the wrong size or its tensors overflow it."""
    path = store / blob.file
    if not path.is_file():
        raise StoreError(f"{what} is missing from {store}; delete the store and convert the model again")
    size = path.stat().st_size
    if size != blob.size:
        raise StoreError(f"{what} is truncated or resized: {size} bytes, expected {blob.size}; delete {store} and convert again")
    for t in blob.tensors.values():
        if t.offset < 0 or t.offset + t.nbytes > blob.size:
            raise StoreError(f"{what}: tensor {t.name} lies outside the blob; {store}/{MANIFEST} is corrupt")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_store(store_dir: str | Path, progress: bool = False) -> Manifest:
    """Check every blob's presence, size and sha256; StoreError naming the first bad one."""
    store = Path(store_dir)
    m = read_manifest(store)
    if len(m.layers) != m.num_layers:
        raise StoreError(f"{store}/{MANIFEST} lists {len(m.layers)} layers but num_layers is {m.num_layers}")
    blobs = _blobs(m)
    paths = [_check_shape(store, what, b) for what, b in blobs]
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("verifying"), BarColumn(), DownloadColumn(),
        console=Console(stderr=True), transient=True, disable=not progress,
    ) as bar:  # fmt: skip
        task = bar.add_task("verifying", total=sum(b.size for _, b in blobs))
        for (what, blob), path in zip(blobs, paths):
            if file_sha256(path) != blob.sha256:
                raise StoreError(f"{what} is corrupt: checksum mismatch; delete {store} and convert the model again")
            bar.advance(task, blob.size)
    return m


def _fingerprint(store: Path, m: Manifest) -> dict:
    """What the marker records: the manifest's sha256 and each blob's size and mtime."""
    files = {}
    for _, blob in _blobs(m):
        st = (store / blob.file).stat()
        files[blob.file] = [st.st_size, st.st_mtime_ns]
    return {"manifest_sha256": file_sha256(store / MANIFEST), "files": files}


def ensure_verified(store_dir: str | Path, progress: bool = False) -> Manifest:
    """verify_store the first time a store is opened; later opens only compare the marker (no hashing)."""
    store = Path(store_dir)
    m = read_manifest(store)
    marker = store / VERIFIED
    try:
        if json.loads(marker.read_text()) == _fingerprint(store, m):
            return m
    except (OSError, ValueError):
        pass  # no marker, unreadable marker or a blob gone: verify fully (which names the problem)
    m = verify_store(store, progress=progress)
    try:
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps(_fingerprint(store, m)))
        os.replace(tmp, marker)
    except OSError:
        pass  # a read-only store stays usable; it is just verified again next time
    return m
