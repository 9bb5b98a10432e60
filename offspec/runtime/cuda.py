"""CUDA staging: a ring of device buffers filled from pinned host buffers on a dedicated copy stream.

disk -> pinned -> device is a pipeline of three workers: the streamer's reader thread fills pinned host
slots, the copy stream moves them to device slots, and compute runs on the current stream. The compute
thread only enqueues: a host slot goes back to the reader from a small releaser thread once its copy has
landed, so neither the host nor the reader waits on every streamed layer's copy.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from functools import partial

import torch


def _release_loop(q: queue.SimpleQueue, wait: Callable[[object], None], state: dict) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        token, release = item
        try:
            wait(token)
        except BaseException as exc:  # surfaced to the compute side on its next push
            state["error"] = exc
        finally:  # hand the slot back even then: a stuck slot would starve the reader
            release()


class SlotReleaser:
    """Calls `release()` once `wait(token)` returns, in a thread of its own, in the order pushed.

    On CUDA the token is an event recorded after a host->device copy and `wait` is its `synchronize`
    (which lets go of the GIL), so a pinned slot is refilled only once its bytes are on the device.
    """

    def __init__(self, wait: Callable[[object], None]) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._state: dict = {"error": None}
        self._thread = threading.Thread(target=_release_loop, args=(self._q, wait, self._state),
                                        name="offspec-release", daemon=True)
        self._thread.start()
        self._closed = False

    def push(self, token: object, release: Callable[[], None]) -> None:
        err = self._state["error"]
        if err is not None:
            self._state["error"] = None
            raise err
        self._q.put((token, release))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(None)
            self._thread.join(timeout=5)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def _wait_event(event) -> None:
    event.synchronize()


class DeviceRing:
    """Uploads layer blobs host->device on a copy stream; compute waits on a per-slot event.

    `upload` enqueues the copy of a pinned host buffer into a free device slot and makes the current
    (compute) stream wait for it; a streamed layer's host staging slot goes back to its streamer once the
    copy has landed (SlotReleaser), without blocking the caller. `done` records when compute has finished
    with the device slot, so the next upload into it waits for that on the device.
    """

    def __init__(self, slots: int, slot_bytes: int, device: torch.device) -> None:
        self.device = device
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.copy_stream = torch.cuda.Stream(device=device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.freed = [torch.cuda.Event() for _ in range(slots)]
        self.next = 0
        self._releaser = SlotReleaser(_wait_event)

    def upload(self, host_buf: torch.Tensor, streamer, host_slot) -> tuple[int, torch.Tensor]:
        slot = self.next
        self.next = (self.next + 1) % len(self.buffers)
        dst = self.buffers[slot]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])
            dst[: host_buf.numel()].copy_(host_buf, non_blocking=True)
            self.copied[slot].record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        if streamer is not None:  # the host slot may be refilled only after the copy landed: not our wait
            landed = torch.cuda.Event()
            landed.record(self.copy_stream)
            self._releaser.push(landed, partial(streamer.release, host_slot))
        return slot, dst

    def done(self, slot: int) -> None:
        self.freed[slot].record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self._releaser.close()
