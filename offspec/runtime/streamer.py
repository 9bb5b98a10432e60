"""The layer streamer: a reader thread fills a ring of reused staging buffers with whole layer blobs.

The reader walks the streamed layers in pass order, forever: once the last streamed layer of a pass
is read it goes on with the first ones of the next pass (prefetch wraps around), and it blocks
only when every slot is full. Each blob is read with one `preadv` into a preallocated buffer, then
(unless `warm`) dropped from the page cache with POSIX_FADV_DONTNEED so every pass really reads
the disk and the page cache does not silently hold the model.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from offspec.errors import StoreError
from offspec.store.manifest import BlobEntry


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_s: float = 0.0  # time the reader spent inside preadv
    wait_s: float = 0.0  # time the compute side waited for a layer
    layers_read: int = 0


def drop_page_cache(path: str | Path) -> None:
    """Evict a file from the page cache (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def alloc_staging(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 staging buffer, touched once so later writes run at full speed."""
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    buf.zero_()
    return buf


def read_into(fd: int, buf: torch.Tensor, size: int, offset: int = 0) -> int:
    """preadv `size` bytes of fd at `offset` into buf[:size]; returns bytes read."""
    view = memoryview(buf.numpy()).cast("B")[:size]
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class LayerStreamer:
    """Streams layer blobs `files[i]` for i in `order` (cyclically) through `slots` staging buffers."""

    def __init__(self, files: dict[int, Path], sizes: dict[int, int], order: list[int], slots: int,
                 warm: bool = False, pin: bool = False,
                 prepare: Callable[[int, torch.Tensor, int], object] | None = None) -> None:
        if slots < 1 or not order:
            raise ValueError("a streamer needs at least one slot and one layer")
        self.files, self.sizes, self.order, self.warm = files, sizes, list(order), warm
        slot_bytes = max(sizes[i] for i in order)
        self.buffers = [alloc_staging(slot_bytes, pin) for _ in range(slots)]
        self.prepare = prepare  # runs in the reader thread after each read (e.g. upcast into a slot buffer)
        self.prepared: list[object] = [None] * slots
        self.stats = StreamStats()
        self._fds = {i: os.open(files[i], os.O_RDONLY) for i in order}
        self._cond = threading.Condition()
        self._ready: list[tuple[int, int]] = []  # FIFO of (layer, slot) read and not yet taken
        self._free = list(range(slots))
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="offspec-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        try:
            while True:
                with self._cond:
                    while not self._free and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    slot = self._free.pop(0)
                layer = self.order[pos]
                pos = (pos + 1) % len(self.order)
                size = self.sizes[layer]
                fd = self._fds[layer]
                t0 = time.perf_counter()
                n = read_into(fd, self.buffers[slot], size)
                dt = time.perf_counter() - t0
                if n != size:
                    raise StoreError(f"{self.files[layer]}: short read ({n} of {size} bytes); the store is truncated")
                if not self.warm:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                if self.prepare is not None:
                    self.prepared[slot] = self.prepare(layer, self.buffers[slot], slot)
                with self._cond:
                    self.stats.bytes_read += n
                    self.stats.read_s += dt
                    self.stats.layers_read += 1
                    self._ready.append((layer, slot))
                    self._cond.notify_all()
        except BaseException as exc:  # surfaced to the compute side on its next acquire
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def acquire(self, layer: int) -> tuple[int, torch.Tensor]:
        """Wait for `layer`'s blob; returns (slot, buffer). Stale layers ahead of it are dropped (resync)."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise RuntimeError("streamer is closed")
                if self._ready:
                    got, slot = self._ready[0]
                    self._ready.pop(0)
                    if got == layer:
                        break
                    self._free.append(slot)  # an aborted pass left this one: skip it
                    self._cond.notify_all()
                    continue
                self._cond.wait()
        self.stats.wait_s += time.perf_counter() - t0
        return slot, self.buffers[slot]

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def load_blob(store_dir: Path, entry: BlobEntry, device: torch.device, pin: bool = False) -> torch.Tensor:
    """Read one whole blob into a new buffer (resident tiers) and drop it from the page cache."""
    path = store_dir / entry.file
    buf = alloc_staging(entry.size, pin=pin)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = read_into(fd, buf, entry.size)
    finally:
        os.close(fd)
    if n != entry.size:
        raise StoreError(f"{path}: short read ({n} of {entry.size} bytes); the store is truncated")
    drop_page_cache(path)
    return buf.to(device) if device.type != "cpu" else buf
