"""Coalescing: requests that arrive while others are in flight go out together as one list
request (SGLang's ``/generate`` takes lists of texts and per-item parameters).

No thread of its own: the caller that finds a free sending slot becomes the *leader*, sends
everything queued so far, hands each waiting caller its result, and passes the slot on to the
next queued caller. With few callers every request goes alone (no added latency); under load
batches grow by themselves, so the cost of an HTTP round trip is shared by many programs.

Coalescing pays when a round trip is short (the client's per-request cost is then what limits
throughput). When round trips are long (a model generating for real), every item of a list
request would wait for the slowest one, so once the measured round trip exceeds
``latency_threshold`` seconds each request goes alone again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sglrun.errors import ServerError

__all__ = ["Coalescer"]

SendBatch = Callable[[list[dict[str, Any]]], list[Any]]


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
        latency_threshold: float = 0.05,
    ) -> None:
        self._send_batch = send_batch
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.latency_threshold = latency_threshold
        self.latency = 0.0  # moving average of a lone request's round trip, in seconds
        self._lock = threading.Lock()
        self._queue: deque[_Waiter] = deque()
        self._in_flight = 0
        self.batches = 0
        self.items = 0

    def call(self, items: list[dict[str, Any]]) -> list[Any]:
        """Send ``items`` (alone or with others) and return their results in order."""
        waiter = _Waiter(items)
        with self._lock:
            self._queue.append(waiter)
            if self._in_flight < self.max_in_flight or self.latency > self.latency_threshold:
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
        items = [item for waiter in batch for item in waiter.items]
        self.batches += 1
        self.items += len(items)
        started = time.perf_counter()
        try:
            results = self._send_batch(items)
            if len(items) == 1:  # a lone request measures the server, not the batch size
                self.latency += (time.perf_counter() - started - self.latency) * 0.2
        except ServerError as exc:
            if len(batch) == 1:
                return self._finish(batch, error=exc)
            # The server answered but refused the batch: one row's bad request (or a
            # poisoned row) must not fail the others, so each caller resends its own items,
            # in its own thread, with its own retries.
            for waiter in batch:
                waiter.solo = True
                waiter.event.set()
            return None
        except Exception as exc:  # transport failure: every caller in the batch sees it
            return self._finish(batch, error=exc)
        position = 0
        for waiter in batch:
            waiter.results = results[position : position + len(waiter.items)]
            position += len(waiter.items)
            waiter.event.set()
        return None

    @staticmethod
    def _finish(batch: list[_Waiter], *, error: BaseException) -> None:
        for waiter in batch:
            waiter.error = error
            waiter.event.set()
