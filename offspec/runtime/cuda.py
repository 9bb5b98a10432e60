"""CUDA staging: a ring of device buffers filled from pinned host buffers on a dedicated copy stream."""

from __future__ import annotations

import torch


class DeviceRing:
    """Uploads layer blobs host->device on a copy stream; compute waits on a per-slot event.

    `upload` enqueues the copy of a pinned host buffer into a free device slot and makes the
    current (compute) stream wait for it; `done` records when compute has finished with the slot,
    so the next upload into it waits for that, and hands the host staging slot back to its streamer
    once the copy has landed.
    """

    def __init__(self, slots: int, slot_bytes: int, device: torch.device) -> None:
        self.device = device
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.copy_stream = torch.cuda.Stream(device=device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.freed = [torch.cuda.Event() for _ in range(slots)]
        self.next = 0
        self._host: dict[int, tuple[object, int]] = {}

    def upload(self, host_buf: torch.Tensor, streamer, host_slot) -> tuple[int, torch.Tensor]:
        slot = self.next
        self.next = (self.next + 1) % len(self.buffers)
        dst = self.buffers[slot]
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])
            dst[: host_buf.numel()].copy_(host_buf, non_blocking=True)
            self.copied[slot].record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        if streamer is not None:
            self.copied[slot].synchronize()  # the host slot may be refilled only after the copy landed
            streamer.release(host_slot)
        return slot, dst

    def done(self, slot: int) -> None:
        self.freed[slot].record(torch.cuda.current_stream(self.device))
