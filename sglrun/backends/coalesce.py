"""Coalescing: requests that arrive while others are in flight go out together as one list
request (SGLang's ``/generate`` takes lists of texts and per-item parameters).

No thread of its own: the caller that finds a free sending slot becomes the *leader*, sends
everything queued so far, hands each waiting caller its result, and passes the slot on to the
next queued caller. With few callers every request goes alone (no added latency); under load
batches grow by themselves, so the cost of an HTTP round trip is shared by many programs.

Inside a batch run on a hub (``sglrun.lang.hub``) there are no threads to lead or follow:
each program's items are gathered by the hub, which sends them together from a worker thread
while it runs the next programs; ``send_together`` is the policy both ways share.

Coalescing pays when a round trip is short: the client's per-request cost is then what limits
throughput. When round trips are long (a model generating for real, answers of very different
lengths) every item of a list request would wait for the slowest one, and there is little CPU
to save, so each request goes alone. The switch is the median of the last ``LATENCY_WINDOW``
round trips (lone and list requests alike): a median is not moved by the long tail of an uneven
server, and a slow list counts against coalescing as well. Measured on the benchmark's servers
(`make bench`, part 7): an instant server's round trips stay under 10 ms even with lists of a
hundred items, a real model's are tens of milliseconds or more.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sglrun.lang.hub import Hub, current_hub
from sglrun.lang.loop_hub import LoopHub

__all__ = ["Coalescer"]

SendBatch = Callable[[list[dict[str, Any]]], list[Any]]

SOLO = object()
"""A group's outcome when its batch failed: send your own items alone."""

PROBE_INTERVAL = 1.0  # seconds between lone requests that measure the server on a hub
LATENCY_WINDOW = 16  # round trips the median is taken over
COALESCE_BELOW = 0.02  # seconds: requests are coalesced while the median round trip is lower


class _Waiter:
    __slots__ = ("items", "results", "error", "event", "leads", "solo")

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        self.event = threading.Event()
        # Sending slots handed to this caller (it may be handed more than one before it
        # wakes); each must be used or passed on, or the slot is lost and callers wait forever.
        self.leads = 0
        self.solo = False  # told to send its own items alone


class Coalescer:
    """Turns concurrent ``call(items)`` into few ``send_batch(all items)`` calls."""

    def __init__(
        self,
        send_batch: SendBatch,
        *,
        max_batch: int = 256,
        max_in_flight: int = 8,
        latency_threshold: float = COALESCE_BELOW,
        cooperative: bool = False,
    ) -> None:
        self._send_batch = send_batch
        # ``send_batch`` parks its caller on a hub instead of blocking (the HTTP transport):
        # batches go out from hub tasks, lone requests from the program's own task.
        self.cooperative = cooperative
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.latency_threshold = latency_threshold
        self._round_trips: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._last_probe = 0.0
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._in_flight = 0
        self.batches = 0
        self.items = 0

    @property
    def latency(self) -> float:
        """The median of the last round trips (seconds; 0 before the first)."""
        trips = list(self._round_trips)
        return statistics.median(trips) if trips else 0.0

    @property
    def slow(self) -> bool:
        """Round trips too long for coalescing to pay: every request goes alone."""
        return self.latency > self.latency_threshold

    def call(self, items: list[dict[str, Any]]) -> list[Any]:
        """Send ``items`` (alone or with others) and return their results in order."""
        hub = current_hub()
        if hub is not None and (hub.live > 1 or isinstance(hub, LoopHub)):
            return self._call_on_hub(hub, items)
        # Threads (or a hub running one program, e.g. ``run()`` in a user's thread): callers
        # in other threads are the ones to coalesce with. Never on the I/O thread's hub: a
        # task there must not wait for a leader whose request needs that very thread.
        waiter = _Waiter(items)
        with self._lock:
            self._queue.append(waiter)
            if self._in_flight < self.max_in_flight or self.slow:
                self._in_flight += 1
                waiter.leads += 1
        try:
            self._use_leads(waiter)
            while waiter.results is None and waiter.error is None and not waiter.solo:
                waiter.event.wait()
                waiter.event.clear()
                self._use_leads(waiter)
        finally:
            self._use_leads(waiter)
        if waiter.solo:
            return self._send_batch(items)
        if waiter.error is not None:
            raise waiter.error
        return waiter.results  # type: ignore[return-value]

    def _call_on_hub(self, hub: Hub, items: list[dict[str, Any]]) -> list[Any]:
        now = time.monotonic()
        send = (lambda f, *a: f(*a)) if self.cooperative else hub.call_blocking
        if self.slow or now - self._last_probe > PROBE_INTERVAL:
            # A slow server (or a due measurement): no batch, so no wait for the slowest item.
            self._last_probe = now
            return send(self._send_alone, items)  # type: ignore[no-any-return]
        outcome = hub.gather(self, items)
        if outcome is SOLO:
            return send(self._send_batch, items)  # type: ignore[no-any-return]
        return outcome  # type: ignore[no-any-return]

    def _send_alone(self, items: list[dict[str, Any]]) -> list[Any]:
        return self.send_together([items])[0]  # type: ignore[no-any-return]

    def send_together(self, groups: Sequence[list[dict[str, Any]]]) -> list[Any]:
        """One request for every group's items; per group its results, or ``SOLO`` when a
        batch of several groups failed (a lone group's failure raises)."""
        items = [item for group in groups for item in group]
        self.batches += 1
        self.items += len(items)
        started = time.perf_counter()
        try:
            results = self._send_batch(items)
        except Exception as exc:
            if len(groups) == 1 or getattr(exc, "timed_out", False):
                # A server that let a whole list time out would let each row time out again:
                # every row of the list gets the timeout, once, not twice the wait.
                raise
            # The batch failed after its retries (a refusal, a broken answer): one row's bad
            # request or bad luck must not fail the others, so each caller resends its own
            # items alone, with its own retries.
            return [SOLO] * len(groups)
        self._round_trips.append(time.perf_counter() - started)
        outcomes, position = [], 0
        for group in groups:
            outcomes.append(results[position : position + len(group)])
            position += len(group)
        return outcomes

    def _use_leads(self, waiter: _Waiter) -> None:
        while True:
            with self._lock:
                if not waiter.leads:
                    return
                waiter.leads -= 1
            self._lead()

    def _take(self) -> list[_Waiter]:
        batch: list[_Waiter] = []
        count = 0
        while self._queue and (not batch or count + len(self._queue[0].items) <= self.max_batch):
            waiter = self._queue.popleft()
            batch.append(waiter)
            count += len(waiter.items)
        return batch

    def _lead(self) -> None:
        """Send one batch, then pass the sending slot to the next queued caller (or free it)."""
        with self._lock:
            batch = self._take()
        try:
            if batch:
                self._deliver(batch)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.leads += 1
                    successor.event.set()
                else:
                    self._in_flight -= 1

    def _deliver(self, batch: list[_Waiter]) -> None:
        try:
            outcomes = self.send_together([waiter.items for waiter in batch])
        except Exception as exc:  # every caller in the batch sees it
            return self._finish(batch, error=exc)
        for waiter, outcome in zip(batch, outcomes):
            if outcome is SOLO:
                waiter.solo = True  # resends in its own thread, with its own retries
            else:
                waiter.results = outcome
            waiter.event.set()
        return None

    @staticmethod
    def _finish(batch: list[_Waiter], *, error: BaseException) -> None:
        for waiter in batch:
            waiter.error = error
            waiter.event.set()
