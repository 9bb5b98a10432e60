"""Honest timing on every device: the one clock that stats, the pass-time curve and the tree-size planner read.

CUDA kernels run asynchronously: reading the host clock right after a forward returns measures the
launches, not the work (a streamed pass once read 0.08 s against a physical floor of 0.21 s, and the
difference was billed to the draft). `clock(device, ...)` first waits until every given CUDA device has
finished what was queued on it, then reads `perf_counter`; on the CPU it is `perf_counter` and nothing
else. Timing the draft and the target apart, as SpecExec does, means reading this clock at the boundary
between them.
"""

from __future__ import annotations

import time

import torch


def _is_cuda(device) -> bool:
    kind = getattr(device, "type", None) or str(device).split(":", 1)[0]
    return kind == "cuda"


def clock(*devices) -> float:
    """`time.perf_counter()` once every given CUDA device has drained its queued work (None and CPUs: no wait)."""
    done = set()
    for d in devices:
        if d is None or not _is_cuda(d):
            continue
        key = str(d)
        if key not in done and torch.cuda.is_available():
            torch.cuda.synchronize(d)
            done.add(key)
    return time.perf_counter()


class Stopwatch:
    """`with Stopwatch(device, ...) as sw:` -> `sw.s`, seconds of the block including the devices' work."""

    def __init__(self, *devices) -> None:
        self.devices = devices
        self.s = 0.0
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        self._t0 = clock(*self.devices)
        return self

    def __exit__(self, *exc) -> None:
        self.s = clock(*self.devices) - self._t0
