"""The device-independent part of the CUDA ring: host slots go back to the reader from a thread of their own,
after their copies land, in order, without the pushing thread waiting."""

from __future__ import annotations

import threading

import pytest

from offspec.runtime.cuda import SlotReleaser


def test_slots_are_released_after_their_wait_returns_in_order_without_blocking_the_pusher():
    released: list[int] = []
    all_done = threading.Event()
    r = SlotReleaser(lambda ev: ev.wait(timeout=10))
    landed = [threading.Event() for _ in range(3)]
    try:
        for i, ev in enumerate(landed):  # pushing returns at once although no copy has landed
            r.push(ev, lambda i=i: (released.append(i), len(released) == 3 and all_done.set()))
        assert released == []
        for ev in landed:
            ev.set()
        assert all_done.wait(timeout=10)
        assert released == [0, 1, 2]
    finally:
        r.close()


def test_a_failed_wait_still_releases_and_surfaces_on_the_next_push():
    released = threading.Event()

    def wait(_):
        raise RuntimeError("copy failed")

    r = SlotReleaser(wait)
    try:
        r.push(None, released.set)
        assert released.wait(timeout=10)  # the slot is not lost
        r.close()  # the loop has run the item: its error is recorded
        with pytest.raises(RuntimeError, match="copy failed"):
            r.push(None, lambda: None)
    finally:
        r.close()
