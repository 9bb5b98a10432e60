"""Everything offspec keeps in OFFSPEC_HOME, listed with sizes, and removed on request.

Kinds: `store` (converted stores), `partial` (interrupted conversions), `demo` (assembled demo GGUFs),
`peer` (copies `bench --peer` exports), and the folders `curves`, `shapes`, `logs`, `locks`; anything else
under the home is listed as `other`. Names are paths relative to the home (stores: their folder name), so
they can be pasted into `generate -m`, `plan`, `verify` and `rm`.

Removal never touches a store another process holds: stores are removed under an exclusive lock on their
manifest (readers hold a shared one), partial folders under their conversion's lock, and lock files only
while their remover holds them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from offspec.errors import StoreError
from offspec.paths import offspec_home
from offspec.store.locks import LOCKS, lock_path, release_shared, try_exclusive, writer_busy
from offspec.store.manifest import MANIFEST, read_manifest

STORES, DEMO, PEER = "stores", "demo", "peer"
FOLDERS = ("curves", "shapes", "logs", LOCKS)


@dataclass(frozen=True)
class CacheItem:
    name: str  # relative to the home (a store: its folder name)
    kind: str
    path: str
    size_bytes: int
    detail: str = ""
    source: str | None = None
    bits: int | None = None
    dtype: str | None = None
    layers: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}


def tree_bytes(path: Path) -> int:
    """Bytes of a file or of every file under a folder (symlinks not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _store_item(path: Path) -> CacheItem:
    try:
        m = read_manifest(path)
    except StoreError:
        return CacheItem(path.name, "other", str(path), tree_bytes(path), "a broken store")
    what = "NF4" if m.bits == 4 else m.dtype
    return CacheItem(path.name, "store", str(path), tree_bytes(path), f"{what}, {m.num_layers} layers, from {m.source}",
                     m.source, m.bits, m.dtype, m.num_layers)


def list_items(home: Path | None = None) -> list[CacheItem]:
    """Everything under the home, one item per store, partial conversion, demo file, peer copy or folder."""
    home = home or offspec_home()
    items: list[CacheItem] = []
    if not home.is_dir():
        return items
    seen: set[Path] = set()
    stores = home / STORES
    if stores.is_dir():
        seen.add(stores)
        for p in sorted(stores.iterdir()):
            if p.name.endswith(".partial") and p.is_dir():
                items.append(CacheItem(f"{STORES}/{p.name}", "partial", str(p), tree_bytes(p),
                                       "an interrupted conversion (rerunning it resumes)"))
            elif p.is_dir() and (p / MANIFEST).is_file():
                items.append(_store_item(p))
            elif p.name.startswith(".") and p.name.endswith(".lock"):
                items.append(CacheItem(f"{STORES}/{p.name}", "lock", str(p), tree_bytes(p), "an old lock file"))
            else:
                items.append(CacheItem(f"{STORES}/{p.name}", "other", str(p), tree_bytes(p)))
    demo = home / DEMO
    if demo.is_dir():
        seen.add(demo)
        for p in sorted(demo.iterdir()):
            if p.name.endswith(".ok"):
                continue  # a check marker: goes with its file
            kind = "demo" if p.suffix == ".gguf" else "other"
            marker = p.with_name(p.name + ".ok")
            size = tree_bytes(p) + (tree_bytes(marker) if marker.exists() else 0)
            items.append(CacheItem(f"{DEMO}/{p.name}", kind, str(p), size,
                                   "assembled demo model" if kind == "demo" else ""))
    peer = home / PEER
    if peer.is_dir():
        seen.add(peer)
        for p in sorted(peer.iterdir()):
            items.append(CacheItem(f"{PEER}/{p.name}", "peer", str(p), tree_bytes(p), "bench --peer copy"))
    for folder in FOLDERS:
        p = home / folder
        if p.is_dir():
            seen.add(p)
            count = sum(1 for _ in p.iterdir())
            if count == 0:
                continue
            items.append(CacheItem(folder, folder.rstrip("s") if folder != "logs" else "log", str(p), tree_bytes(p),
                                   f"{count} file{'s' if count != 1 else ''}"))
    for p in sorted(home.iterdir()):
        if p not in seen:
            items.append(CacheItem(p.name, "other", str(p), tree_bytes(p)))
    return items


def list_stores(home: Path | None = None) -> list[dict]:
    """The finished stores: name, path, source, bits, dtype, size_bytes, layers."""
    return [i.as_dict() for i in list_items(home) if i.kind == "store"]


def find_items(names: list[str], home: Path | None = None) -> list[CacheItem]:
    """The items with these names (as `offspec models` prints them); StoreError naming the first unknown one."""
    by_name = {i.name: i for i in list_items(home)}
    found = []
    for name in names:
        item = by_name.get(name.rstrip("/"))
        if item is None:
            raise StoreError(f"nothing named {name} in {home or offspec_home()} (see `offspec models`)")
        if item not in found:
            found.append(item)
    return found


def _source_changed(item: CacheItem) -> bool:
    """True if the store's source is still there but changed since (so the store is never reused)."""
    from offspec.store.convert import source_key, store_key

    if not item.source or not Path(item.source).exists():
        return False
    try:
        return store_key(Path(item.path)) != source_key(item.source, item.bits, item.dtype)
    except (OSError, StoreError):
        return False


def _created(item: CacheItem) -> float:
    try:
        return float(json.loads((Path(item.path) / "convert.json").read_text()).get("created", 0))
    except (OSError, ValueError):
        return 0.0


def prune_candidates(home: Path | None = None) -> list[CacheItem]:
    """What `prune` removes: stale partial folders and lock files, stores whose source changed since, and
    extra copies of a source in another dtype (the newest copy stays)."""
    items = list_items(home)
    out: list[CacheItem] = []
    for item in items:
        if item.kind in ("partial", "lock", "locks"):
            out.append(item)
        elif item.kind == "demo" and ".tmp" in item.name:
            out.append(item)
    stores = [i for i in items if i.kind == "store"]
    stale = [i for i in stores if _source_changed(i)]
    out += [CacheItem(i.name, i.kind, i.path, i.size_bytes, "its source changed since; never reused",
                      i.source, i.bits, i.dtype, i.layers) for i in stale]
    groups: dict[tuple, list[CacheItem]] = {}
    for i in stores:
        if i not in stale and i.source:
            groups.setdefault((i.source, i.bits), []).append(i)
    for group in groups.values():
        if len({i.dtype for i in group}) > 1:
            keep = max(group, key=_created)
            out += [CacheItem(i.name, i.kind, i.path, i.size_bytes, f"a copy in {i.dtype}; {keep.name} is newer",
                              i.source, i.bits, i.dtype, i.layers) for i in group if i is not keep]
    return out


def remove_item(item: CacheItem, home: Path | None = None) -> bool:
    """Remove one item; False (nothing removed) if another process holds it."""
    path = Path(item.path)
    if item.kind == "store":
        release_shared(path)  # this process's own read lock, if it used the store
        fd = try_exclusive(path / MANIFEST)
        if fd is None:
            return not path.exists()
        try:
            if writer_busy(path, home):
                return False
            shutil.rmtree(path)
        finally:
            os.close(fd)
        return True
    if item.kind == "partial":
        out = path.with_name(path.name[: -len(".partial")])
        lock = lock_path(out, home)
        fd = try_exclusive(lock) if lock.exists() else None
        if lock.exists() and fd is None:
            return False  # a conversion is writing it now
        try:
            shutil.rmtree(path, ignore_errors=True)
            if fd is not None:
                lock.unlink(missing_ok=True)  # unlinked while held: no one else holds it
        finally:
            if fd is not None:
                os.close(fd)
        return True
    if item.kind in ("lock", "locks"):
        files = [path] if path.is_file() else sorted(path.iterdir())
        all_gone = True
        for f in files:
            fd = try_exclusive(f)
            if fd is None:
                all_gone = False
                continue
            try:
                f.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return all_gone
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if item.kind == "demo":
        path.with_name(path.name + ".ok").unlink(missing_ok=True)
    return True
