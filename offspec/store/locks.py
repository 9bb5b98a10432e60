"""Locks on stores: exclusive while a store is written or removed, shared while a complete store is read.

- Conversions lock `$OFFSPEC_HOME/locks/<name>-<hash>.lock` (one folder, which `offspec prune` cleans),
  falling back to a hidden file beside OUT only when the home is read-only.
- Readers of a complete store take a shared lock on its manifest.json, opened read-only: no write access
  is needed, so a read-only cache works. `rm`/`prune` take the exclusive lock without waiting and skip a
  store that someone holds.
- A lock file is unlinked only while its unlinker holds it exclusively, and a locker checks after locking
  that its file is still the one at the path (else it locks again): a held lock is never unlinked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from offspec.paths import offspec_home

LOCKS = "locks"
_held: dict[str, int] = {}  # store path -> fd of its manifest, shared-locked for the life of the process


def locks_dir(home: Path | None = None) -> Path:
    return (home or offspec_home()) / LOCKS


def lock_path(out: Path, home: Path | None = None) -> Path:
    """The lock file guarding writes to the store folder `out`."""
    out = Path(out).absolute()
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:12]
    root = locks_dir(home)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root / f"{out.name}-{digest}.lock"
    except OSError:
        pass
    return out.with_name(f".{out.name}.lock")  # read-only home: beside OUT (whose parent must be writable)


def _lock_file(path: Path, flags: int) -> int | None:
    """An fd holding flock(flags) on the file now at path (created if needed); None if LOCK_NB and busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # unlinked (by prune) between open and flock: lock the new file instead


@contextlib.contextmanager
def exclusive(out: Path, home: Path | None = None) -> Iterator[None]:
    """Hold the write lock of store folder `out` (waits for another writer); the lock file goes when done."""
    path = lock_path(out, home)
    fd = _lock_file(path, fcntl.LOCK_EX)
    try:
        yield
    finally:
        try:
            path.unlink()  # while held: a waiting locker sees its inode is gone and locks the new file
        except OSError:
            pass
        os.close(fd)


def try_exclusive(path: Path) -> int | None:
    """A held exclusive lock on the existing file `path` (an fd to close), or None if busy or gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def writer_busy(out: Path, home: Path | None = None) -> bool:
    """True if a conversion into `out` holds its lock right now."""
    path = lock_path(out, home)
    if not path.exists():
        return False
    fd = try_exclusive(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def hold_shared(store: Path) -> None:
    """Take (once per process) a shared lock on a complete store's manifest; read-only access suffices."""
    key = str(Path(store).resolve())
    if key in _held:
        return
    try:
        fd = os.open(Path(key) / "manifest.json", os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return
    _held[key] = fd


def release_shared(store: Path) -> None:
    """Drop this process's shared lock on a store (before this process removes it)."""
    fd = _held.pop(str(Path(store).resolve()), None)
    if fd is not None:
        os.close(fd)
