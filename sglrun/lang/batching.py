"""Batching on a hub: items that many tasks wait for, sent together.

Why: SGLang's ``/generate`` takes a list of texts, so a hundred programs waiting for a hundred
short answers can share one round trip. ``Hub.gather`` parks a task with its items; ``flush``
sends the items gathered so far as one batch once they are worth it (half the live tasks) or
once the hub has nothing else to run and no batch of that batcher is out (or it has been
out ``HOLD_LIMIT``), with at most ``max_in_flight`` batches out per batcher. A batcher with a
``settle`` time (a provider's batch API) sends only once the hub is idle and nothing new has
been gathered for that long: every live program waits for its next call. A batcher that
answers on the hub's own thread (the call cache) may say ``send_when_idle``: nothing is gained
by sending before every runnable program has gathered its item (measured on a fully cached
rerun of 20,000 rows: 42 keys a query and 3.45 s with the goal of half, 71 keys and 3.16 s).

Why wait for the batch that is out: sent as soon as the hub idles, every batch only held the
programs its predecessor had woken, and once the batches were small they stayed small
(measured on the instant server, 10,000 rows of the reference program: 38,000 requests for
50,000 items, ~400 rows/s, whenever the programs cost a little more CPU); held until one
comes back, they merge again (1,100 requests, ~900 rows/s on the same run).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import greenlet

if TYPE_CHECKING:
    from sglrun.lang.hub import Hub, Task

__all__ = ["HOLD_LIMIT", "Batcher", "Batches", "Pending"]

HOLD_LIMIT = 0.02  # seconds a small batch may wait for its batcher's batch in flight


class Batcher(Protocol):
    """What ``Hub.gather`` needs of whoever sends the batches. A batcher whose
    ``send_together`` only waits through the hub (``wait_for``, ``run_blocking``) may say
    ``cooperative = True``: its batches are then sent by a task of the hub, not a thread."""

    max_batch: int
    max_in_flight: int

    def send_together(self, groups: Sequence[list[Any]]) -> list[Any]:
        """Send every group's items in one go; return one outcome per group."""


class Pending:
    """One batcher's waiting groups and its batches in flight."""

    __slots__ = ("batcher", "groups", "waiters", "items", "in_flight", "sent_at", "added_at",
                 "settle", "when_idle")  # fmt: skip

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.groups: list[list[Any]] = []
        self.waiters: list[tuple[Task, int]] = []
        self.items = 0
        self.in_flight = 0
        self.sent_at = 0.0  # when its last batch went out (``time.monotonic()``)
        self.added_at = 0.0  # when its last group was gathered
        self.settle: float = getattr(batcher, "settle", 0.0)
        self.when_idle: bool = getattr(batcher, "send_when_idle", False)


class Batches:
    """The batches of one hub, per batcher."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._pending: dict[int, Pending] = {}
        # When a batch held back for the one out must go anyway (None: none is held); the
        # hub wakes then even if nothing comes back.
        self.held_until: float | None = None

    def gather(self, batcher: Batcher, items: list[Any]) -> Any:
        """Queue ``items`` to go out with other tasks' items; return this group's outcome."""
        pending = self._pending.get(id(batcher))
        if pending is None:
            pending = self._pending[id(batcher)] = Pending(batcher)
        task = greenlet.getcurrent()
        pending.groups.append(items)
        pending.waiters.append((task, task.token))
        pending.items += len(items)
        if pending.settle:
            pending.added_at = time.monotonic()
        return self.hub.park()

    def _goal(self) -> int:
        """Items worth a batch before the hub runs out of work: half the live tasks, so about
        two batches are out while the hub runs the programs the last one answered."""
        return max(4, self.hub.live // 2)

    def flush(self, *, force: bool) -> None:
        goal = self._goal()
        now = time.monotonic()
        held: float | None = None
        for pending in self._pending.values():
            batcher = pending.batcher
            while pending.groups and pending.in_flight < batcher.max_in_flight:
                if pending.settle:
                    due = pending.added_at + pending.settle
                    if not force or now < due:
                        if force:
                            held = due if held is None else min(held, due)
                        break
                elif pending.items < (batcher.max_batch if pending.when_idle else goal):
                    if not force:
                        break
                    # Short of the goal with the hub idle: wait a little for the batch that
                    # is out, which comes back with more to send along; never longer than
                    # HOLD_LIMIT, so a slow answer holds up only its own programs.
                    due = pending.sent_at + HOLD_LIMIT
                    if pending.in_flight and now < due:
                        held = due if held is None else min(held, due)
                        break
                pending.sent_at = now
                self._send(pending, batcher.max_batch)
        self.held_until = held

    def _send(self, pending: Pending, max_batch: int) -> None:
        """Hand the oldest groups (up to ``max_batch`` items) to a worker as one batch."""
        groups = pending.groups
        taken = count = 0
        while taken < len(groups) and (not taken or count + len(groups[taken]) <= max_batch):
            count += len(groups[taken])
            taken += 1
        batch, pending.groups = groups[:taken], groups[taken:]
        waiters, pending.waiters = pending.waiters[:taken], pending.waiters[taken:]
        pending.items -= count
        pending.in_flight += 1
        send_together = pending.batcher.send_together
        cooperative = getattr(pending.batcher, "cooperative", False)
        hub = self.hub
        deliver = self._returned if cooperative else hub._put

        def job() -> None:
            try:
                deliver((pending, 0, (waiters, send_together(batch)), None))
            except BaseException as exc:  # noqa: BLE001 - every task of the batch sees it
                deliver((pending, 0, (waiters, None), exc))

        if cooperative:
            hub.spawn_helper(job)  # a task, not counted in ``live``: it serves the others
        else:
            hub._submit(job)

    def _returned(self, entry: tuple[Any, ...]) -> None:
        """A batch came back on the hub's own thread (a sender task)."""
        pending, _token, value, error = entry
        self.returned(pending, value, error)
        self.hub._notify()

    def returned(self, pending: Pending, value: Any, error: BaseException | None) -> None:
        """One outcome per task of a batch that came back (or its error for each)."""
        pending.in_flight -= 1
        waiters, outcomes = value
        for position, (task, task_token) in enumerate(waiters):
            outcome = None if error is not None else outcomes[position]
            self.hub.ready(task, task_token, outcome, error)
