"""The serving loop: one thread admits waiting requests into the batch engine's free slots and runs its passes,
handing each request's events to the request's callback. Requests beyond the free slots wait in a bounded queue.

Callbacks run on the loop's thread and must only hand the event over (e.g. to an asyncio loop). A request gets
TextEvents, the last one with `step.finish` set, or one exception: the batch engine's failure for it, `QueueFull`
(from `submit`), or `ShuttingDown` when the loop stops before it ends.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from offspec.batch import BatchEngine, Sequence
from offspec.errors import OffspecError
from offspec.generate import GenerationConfig, TextEvent

Event = TextEvent | Exception


class QueueFull(OffspecError):
    """Every slot is busy and the waiting queue is full."""


class ShuttingDown(OffspecError):
    """The server is stopping: the request was cancelled (or not admitted)."""


@dataclass
class Ticket:
    """One submitted request: its prompt and settings, its callback, and its sequence once admitted."""

    prompt_ids: list[int]
    cfg: GenerationConfig
    on_event: Callable[[Event], None]
    seq: Sequence | None = None
    cancelled: bool = False
    done: bool = False
    submitted_s: float = field(default_factory=time.perf_counter)
    admitted_s: float = 0.0


class Scheduler:
    """Runs a BatchEngine on a thread of its own; `submit` and `cancel` may be called from any thread."""

    def __init__(self, batch: BatchEngine, max_queue: int) -> None:
        self.batch, self.max_queue = batch, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # id(sequence) -> ticket
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="offspec-serve", daemon=True)
        self.failures = 0  # passes that raised outside any one request's handling

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], cfg: GenerationConfig, on_event: Callable[[Event], None]) -> Ticket:
        """Queue a request; QueueFull when every slot is taken and max_queue requests already wait."""
        ticket = Ticket(list(prompt_ids), cfg, on_event)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            waiting = sum(not t.cancelled for t in self._waiting)
            if waiting + 1 - self.batch.free_slots > self.max_queue:
                raise QueueFull(f"all {len(self.batch.slots)} slots are busy and {len(self._waiting)} requests "
                                "already wait; retry later")
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: a waiting request is dropped, a running one leaves before the next pass."""
        with self._cond:
            ticket.cancelled = True
            if ticket.seq is not None:
                self.batch.cancel(ticket.seq)
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Stop after the pass that runs now: what waits or runs gets ShuttingDown (returns at once)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def stop(self, timeout: float = 60.0) -> None:
        """request_stop, then wait for the loop to end."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the loop's thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                self.batch.drop_cancelled()
                self._forget_cancelled()
                self._admit()
            if not self._running:
                continue
            try:
                events = self.batch.step()
            except Exception as exc:  # noqa: BLE001 - a bug in a pass must not take the server down
                self.failures += 1
                events = [(t.seq, exc) for t in self._running.values()]
                self.batch.reset()
            for seq, ev in events:
                self._deliver(seq, ev)
        self._shut_down()

    def _admit(self) -> None:
        """Move waiting requests into free slots (under the lock)."""
        while self._waiting and self.batch.free_slots:
            ticket = self._waiting.popleft()
            if ticket.cancelled:
                continue
            try:
                ticket.seq = self.batch.start(ticket.prompt_ids, ticket.cfg)
            except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails alone
                self._send(ticket, exc)
                continue
            ticket.admitted_s = time.perf_counter()
            self._running[id(ticket.seq)] = ticket

    def _deliver(self, seq: Sequence, ev: Event) -> None:
        ticket = self._running.get(id(seq))
        if ticket is None:
            return
        if isinstance(ev, Exception) or ev.step.finish:
            del self._running[id(seq)]
        self._send(ticket, ev)

    def _forget_cancelled(self) -> None:
        """Running requests whose client left (their slots are free again): stop tracking them (under the lock)."""
        for key, ticket in list(self._running.items()):
            if ticket.cancelled:
                del self._running[key]
                ticket.done = True

    def _send(self, ticket: Ticket, ev: Event) -> None:
        if isinstance(ev, Exception) or ev.step.finish:
            ticket.done = True
        try:
            ticket.on_event(ev)
        except Exception:  # noqa: BLE001 - a receiver that is gone must not stop the loop
            pass

    def _shut_down(self) -> None:
        with self._cond:
            tickets = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
        for ticket in tickets:
            if ticket.seq is not None:
                self.batch.cancel(ticket.seq)
            if not ticket.done:
                self._send(ticket, ShuttingDown("the server is shutting down"))
