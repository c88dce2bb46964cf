"""Cooperative scheduling: many programs of a batch as greenlets on one thread.

Why: against a fast server a batch spends its CPU switching threads, not running programs.
Every request parks a thread and wakes it later (about 30 µs of CPU here, more with a hundred
threads fighting for the GIL), while a greenlet switch costs about 1 µs. So ``run_batch`` on a
backend that never blocks the thread itself (``Backend.cooperative``) runs each program as a
``Task`` on a ``Hub`` in the caller's thread. A task that must wait parks, and the hub runs
another:

- ``call_blocking``: work that blocks (an HTTP request, an engine call) runs on a worker thread;
- ``gather``: items of many tasks for one ``Batcher`` go out as one batch (SGLang's list form
  of ``/generate``), sent by a worker thread while the hub runs the next programs;
- ``park`` / ``wake``: a task waits for another (a fork's variable, a finished program).

A program's own blocking code (``time.sleep``, its own network calls) holds up every program
on the hub. The hub adds up the time tasks keep the thread without computing (slices blocked
longer than ``slow_slice``); once that is over ``BLOCKED_LIMIT`` seconds and a fifth of the
hub's time, it reports it (``on_slow``) and ``run_batch`` runs the rows not yet started on
threads. Short stalls (waiting for the GIL, the machine pausing the process) stay under it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter, thread_time
from typing import Any, Protocol

import greenlet

__all__ = ["Batcher", "Hub", "Task", "current_hub", "report_blocking", "start_hub_thread"]

logger = logging.getLogger("sglrun.lang")

SLOW_SLICE = 0.02  # a task slice blocked longer than this (seconds) counts as blocking
BLOCKED_LIMIT = 0.5  # blocked seconds (and a fifth of the hub's time) before on_slow
BLOCKED_SHARE = 0.2


class Batcher(Protocol):
    """What ``Hub.gather`` needs of whoever sends the batches."""

    max_batch: int
    max_in_flight: int

    def send_together(self, groups: Sequence[list[Any]]) -> list[Any]:
        """Send every group's items in one go; return one outcome per group."""


_SPAWN, _STOP = object(), object()  # inbox markers: a posted task, the end of ``serve``


def report_blocking(batch: str) -> Callable[[float], None]:
    """An ``on_slow`` for a batch: one warning that its rows not yet started move to threads."""

    def report(blocked: float) -> None:
        logger.warning(
            "%s: programs kept the batch thread blocked for %.2f s in their own code (not "
            "waiting on the model); the rows not yet started run on threads",
            batch,
            blocked,
        )

    return report


def current_hub() -> Hub | None:
    """The hub running the current greenlet, or None outside any hub task."""
    return getattr(greenlet.getcurrent(), "hub", None)


class Task(greenlet.greenlet):
    """One function run as a greenlet on a hub; ``result`` or ``error`` once ``done``."""

    def __init__(self, hub: Hub, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__(parent=hub.main)
        self.hub = hub
        self.function = function
        self.args = args
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None
        self.joiners: list[greenlet.greenlet] = []
        self.on_done: Callable[[Task], None] | None = None

    def run(self, *_: Any) -> None:  # called by greenlet on the first switch
        try:
            self.result = self.function(*self.args)
        except Exception as exc:  # kept for whoever joins the task
            self.error = exc
        finally:
            self.done = True
            self.hub.finished(self)


class _Pending:
    """One batcher's waiting groups and its batches in flight."""

    __slots__ = ("batcher", "groups", "tasks", "items", "in_flight")

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.groups: list[list[Any]] = []
        self.tasks: list[Task] = []
        self.items = 0
        self.in_flight = 0


class Hub:
    """Runs tasks on the thread that created it; only that thread's greenlets may park."""

    def __init__(
        self,
        workers: int,
        *,
        slow_slice: float = SLOW_SLICE,
        on_slow: Callable[[float], None] | None = None,
    ) -> None:
        self.main = greenlet.getcurrent()
        self.thread = threading.get_ident()
        self.workers = max(1, workers)
        self.slow_slice = slow_slice
        self.on_slow = on_slow
        self.blocked = 0.0  # seconds tasks kept the thread blocked in their own code
        self.slow_seen = False  # on_slow was called
        self._started = perf_counter()
        self.live = 0  # tasks spawned and not finished
        self._ready: deque[tuple[greenlet.greenlet, Any, BaseException | None]] = deque()
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._pending: dict[int, _Pending] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._stopping = False

    # ------------------------------------------------------------------ tasks
    def spawn(self, function: Callable[..., Any], *args: Any) -> Task:
        task = Task(self, function, args)
        self.live += 1
        self._ready.append((task, None, None))
        return task

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Spawn a task from any thread (the hub spawns it when it next looks at its inbox)."""
        self._inbox.put((_SPAWN, (function, args), None))

    def serve(self) -> None:
        """Run tasks as they are posted until ``stop`` is posted (a hub on its own thread)."""
        try:
            while not self._stopping:
                self.step()
        finally:
            self.close()

    def stop(self) -> None:
        """From any thread: let ``serve`` return; tasks still parked are abandoned."""
        self._inbox.put((_STOP, None, None))

    def finished(self, task: Task) -> None:
        self.live -= 1
        for joiner in task.joiners:
            self._ready.append((joiner, None, None))
        task.joiners.clear()
        if task.on_done is not None:
            task.on_done(task)

    def join(self, task: Task | Future[Any]) -> Any:
        """Wait for a task (or a thread's future) and return its result or raise its error.
        From the hub's own greenlet this drives the hub; from a task it parks."""
        if isinstance(task, Future):
            return self._join_future(task)
        if not task.done:
            if greenlet.getcurrent() is self.main:
                while not task.done:
                    self.step()
            else:
                task.joiners.append(greenlet.getcurrent())
                while not task.done:
                    self.park()
        if task.error is not None:
            raise task.error
        return task.result

    def _join_future(self, future: Future[Any]) -> Any:
        if not future.done():
            if greenlet.getcurrent() is not self.main:
                return self.call_blocking(future.result)
            future.add_done_callback(lambda _: self._inbox.put((None, None, None)))
            while not future.done():
                self.step()
        return future.result()

    # ----------------------------------------------------------------- waiting
    def park(self) -> Any:
        """Give the thread to the hub until ``wake`` (or a worker's answer) resumes this task."""
        value, error = self.main.switch()
        if error is not None:
            raise error
        return value

    def wake(self, task: greenlet.greenlet, value: Any = None) -> None:
        """Resume a parked task (from any thread)."""
        if threading.get_ident() == self.thread:
            self._ready.append((task, value, None))
        else:
            self._inbox.put((task, value, None))

    def call_blocking(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking work on a worker thread; the calling task parks meanwhile."""
        task = greenlet.getcurrent()
        inbox = self._inbox

        def job() -> None:
            try:
                inbox.put((task, function(*args, **kwargs), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                inbox.put((task, None, exc))

        self._submit(job)
        return self.park()

    def gather(self, batcher: Batcher, items: list[Any]) -> Any:
        """Queue ``items`` to go out with other tasks' items; return this group's outcome."""
        pending = self._pending.get(id(batcher))
        if pending is None:
            pending = self._pending[id(batcher)] = _Pending(batcher)
        pending.groups.append(items)
        pending.tasks.append(greenlet.getcurrent())
        pending.items += len(items)
        return self.park()

    # ----------------------------------------------------------------- the loop
    def _submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sglrun-hub")
        self._pool.submit(job)

    def step(self) -> None:
        """Run what is ready, send what is gathered, else wait for a worker's answer."""
        self._take_inbox(block=False)
        if self._ready:
            self._run_ready()
            self._flush(force=False)
            return
        self._flush(force=True)
        if self._ready:
            return
        # Nothing to run: wait for a worker's answer, a posted task or a wake from another
        # thread.
        self._take_inbox(block=True)

    def _run_ready(self) -> None:
        ready = self._ready
        count = 0
        cpu = thread_time()  # once per round: a thread clock read is a system call
        for _ in range(len(ready)):
            target, value, error = ready.popleft()
            if target.dead:
                continue
            started = perf_counter()
            target.switch((value, error))
            spent = perf_counter() - started
            # Wall time the task kept the thread without using it: blocked in its own code
            # (computing, garbage collection included, is not blocking). The CPU time of the
            # whole round so far is subtracted, so this never overstates the blocking.
            if spent > self.slow_slice and not self.slow_seen:
                blocked = spent - (thread_time() - cpu)
                if blocked > self.slow_slice:
                    self._note_blocked(blocked)
            count += 1
            if count % 16 == 0:
                self._flush(force=False)

    def _goal(self) -> int:
        """Items worth a batch before the hub runs out of work: half the live tasks, so about
        two batches are out while the hub runs the programs the last one answered."""
        return max(4, self.live // 2)

    def _note_blocked(self, blocked: float) -> None:
        self.blocked += blocked
        share = self.blocked / max(perf_counter() - self._started, 1e-9)
        if self.blocked > BLOCKED_LIMIT and share > BLOCKED_SHARE:
            self.slow_seen = True
            if self.on_slow is not None:
                self.on_slow(self.blocked)

    def _flush(self, *, force: bool) -> None:
        goal = self._goal()
        for pending in self._pending.values():
            batcher = pending.batcher
            while pending.groups and pending.in_flight < batcher.max_in_flight:
                if not force and pending.items < goal:
                    break
                self._send(pending, batcher.max_batch)

    def _send(self, pending: _Pending, max_batch: int) -> None:
        """Hand the oldest groups (up to ``max_batch`` items) to a worker as one batch."""
        groups = pending.groups
        taken = count = 0
        while taken < len(groups) and (not taken or count + len(groups[taken]) <= max_batch):
            count += len(groups[taken])
            taken += 1
        batch, pending.groups = groups[:taken], groups[taken:]
        tasks, pending.tasks = pending.tasks[:taken], pending.tasks[taken:]
        pending.items -= count
        pending.in_flight += 1
        inbox = self._inbox
        send_together = pending.batcher.send_together

        def job() -> None:
            try:
                inbox.put((pending, (tasks, send_together(batch)), None))
            except BaseException as exc:  # noqa: BLE001 - every task of the batch sees it
                inbox.put((pending, (tasks, None), exc))

        self._submit(job)

    def _take_inbox(self, *, block: bool) -> None:
        inbox = self._inbox
        while True:
            try:
                entry = inbox.get(block)
            except queue.Empty:
                return
            block = False
            target, value, error = entry
            if isinstance(target, _Pending):  # a batch came back: one outcome per task
                target.in_flight -= 1
                tasks, outcomes = value
                for position, task in enumerate(tasks):
                    outcome = None if error is not None else outcomes[position]
                    self._ready.append((task, outcome, error))
            elif target is _SPAWN:
                self.spawn(value[0], *value[1])
            elif target is _STOP:
                self._stopping = True
            elif target is not None:
                self._ready.append((target, value, error))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def start_hub_thread(
    workers: int, *, on_slow: Callable[[float], None] | None = None, name: str = "sglrun-hub"
) -> Hub:
    """A hub serving on its own daemon thread, fed with ``post`` from other threads (the batch
    runner's feeder); ``stop`` ends it."""
    started: queue.SimpleQueue[Hub] = queue.SimpleQueue()

    def main() -> None:
        hub = Hub(workers, on_slow=on_slow)
        started.put(hub)
        hub.serve()

    threading.Thread(target=main, name=name, daemon=True).start()
    return started.get()
