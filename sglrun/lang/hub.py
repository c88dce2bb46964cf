"""Cooperative concurrency: programs as greenlets on one thread, blocking work on workers.

Why: against a fast server a batch spends its CPU switching threads, not running programs.
Every request parks a thread and wakes it later (about 30 µs of CPU here, more with a hundred
threads fighting for the GIL), while a greenlet switch costs about 1 µs. So every program runs
as a ``Task`` on a ``Hub``; a task that must wait parks, and the hub runs another:

- ``run_blocking`` / ``Hub.call_blocking``: work that blocks (an HTTP request, an engine call)
  runs on a worker thread while the task is parked; outside any hub it simply runs;
- ``gather``: items of many tasks for one ``Batcher`` go out as one batch (SGLang's list form
  of ``/generate``), sent by a worker thread while the hub runs the next programs;
- ``park`` / ``wake``: a task waits for another (a fork's variable, a finished program).

Every park has a token: a wake carries the token it was meant for and a stale one (an answer
that arrives after the task was cancelled and moved on) is dropped, so ``cancel`` is safe at any
park point.

A program's own blocking code (``time.sleep``, its own network calls) holds up every program
on the hub. The hub adds up the time tasks keep the thread without computing (slices blocked
longer than ``slow_slice``); once that is over ``BLOCKED_LIMIT`` seconds and a fifth of the
hub's time, it reports it (``on_slow``) and the scheduler runs the rows not yet started on
threads. Short stalls (waiting for the GIL, the machine pausing the process) stay under it.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter, thread_time
from typing import Any, TypeVar

import greenlet

from sglrun.errors import RowTimeout
from sglrun.lang.batching import Batcher, Batches, Pending

__all__ = [
    "Batcher",
    "Cancelled",
    "Hub",
    "Stuck",
    "Task",
    "current_hub",
    "current_task",
    "map_concurrently",
    "report_blocking",
    "run_blocking",
    "wait_for",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SLOW_SLICE = 0.02  # a task slice blocked longer than this (seconds) counts as blocking
BLOCKED_LIMIT = 0.5  # blocked seconds (and a fifth of the hub's time) before on_slow
BLOCKED_SHARE = 0.2
WORKER_IDLE = 30.0  # seconds an idle worker thread waits for work before it ends


class Cancelled(BaseException):  # noqa: N818 - a signal to unwind, like KeyboardInterrupt
    """Raised in a task at its park point by ``Hub.cancel``; carries the error to record.

    A ``BaseException`` so that a program's own ``except Exception`` cannot swallow it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Stuck(Cancelled):
    """Raised (asynchronously, by ``Hub.interrupt_overdue``) in a task that kept its hub's
    thread past its deadline without parking: a program stuck computing."""

    def __init__(self) -> None:
        super().__init__(RowTimeout("the row ran past its time limit while computing (stuck)"))


_SPAWN, _CALL = object(), object()  # inbox markers


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


def current_task() -> Task | None:
    """The task running now, or None outside any hub task."""
    current = greenlet.getcurrent()
    return current if isinstance(current, Task) else None


Resume = Callable[[Any, "BaseException | None"], None]


def wait_for(start: Callable[[Resume], None]) -> Any:
    """Wait for work that finishes elsewhere (an asyncio loop, a callback): ``start(resume)``
    begins it and ``resume(value, error)``, called from any thread, ends the wait. A hub task
    parks meanwhile; any other caller blocks its thread."""
    task = current_task()
    if task is not None:
        return task.hub.suspend(start)
    done = threading.Event()
    outcome: list[Any] = [None, None]

    def resume(value: Any, error: BaseException | None) -> None:
        outcome[0], outcome[1] = value, error
        done.set()

    start(resume)
    done.wait()
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def map_concurrently(function: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[function(item) for item in items]``, all at once: as tasks of the calling task's hub
    (a program's requests in parallel, never blocking the hub), else on threads. Results keep
    the items' order; the first error is raised once every call has ended."""
    task = current_task()
    if task is not None:
        hub = task.hub
        tasks = [hub.spawn(function, item) for item in items]
        results: list[Any] = []
        first_error: BaseException | None = None
        for child in tasks:
            try:
                results.append(hub.join(child))
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
        return list(pool.map(function, items))


def run_blocking(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking work without holding up a hub: on a worker thread while the calling task
    parks, or directly when the caller is no hub task. The one way sglrun waits on I/O."""
    hub = current_hub()
    if hub is None:
        return function(*args, **kwargs)
    return hub.call_blocking(function, *args, **kwargs)  # type: ignore[no-any-return]


class Task(greenlet.greenlet):  # type: ignore[misc]  # greenlet has no stubs
    """One function run as a greenlet on a hub; ``result`` or ``error`` once ``done``."""

    def __init__(self, hub: Hub, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        super().__init__(parent=hub.main)
        self.hub = hub
        self.function = function
        self.args = args
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.token = 0  # the wake that may resume this task next must carry this value
        self.joiners: list[tuple[greenlet.greenlet, int]] = []
        self.on_done: Callable[[Task], None] | None = None
        self.pending_error: BaseException | None = None  # cancelled before it started
        self.finished_hook = True  # counted in the hub's ``live`` tasks
        # A row's time limit (``time.monotonic()``) and the batch it belongs to (told when
        # the task blocks the hub); forks inherit their program's.
        parent = greenlet.getcurrent()
        self.deadline: float | None = getattr(parent, "deadline", None)
        self.group: Any = getattr(parent, "group", None)
        # What a row's tasks share (its captured stdout, say); set by whoever runs the row.
        self.context: dict[str, Any] | None = getattr(parent, "context", None)

    def run(self, *_: Any) -> None:  # called by greenlet on the first switch
        try:
            if self.pending_error is not None:
                raise self.pending_error
            self.result = self.function(*self.args)
        except Cancelled as cancelled:
            self.error = cancelled.error
        except Exception as exc:  # kept for whoever joins the task
            self.error = exc
        finally:
            self.done = True
            self.hub.finished(self)


class _Workers:
    """Daemon worker threads, started as work arrives and ended when idle: an abandoned job
    (a hung request after an interrupt) can never keep the process from exiting.

    Counts: ``_idle`` workers wait for work that no job has claimed yet; ``_backlog`` jobs
    wait for a worker (all ``limit`` were busy). A worker that finishes takes a backlogged job
    before it counts itself idle: counted the other way round, each backlogged job left one
    idle worker too many on the books, the workers then ended on their idle timeout while
    the books still showed them idle, and a later job was queued for a worker that did not
    exist (500 programs asking at once hung the next batch for good)."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit = max(1, limit)
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._backlog = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = False
            if self._idle > 0:
                self._idle -= 1  # claimed: an idle worker takes this job
            elif self._threads < self.limit:
                self._threads += 1
                start = True
            else:
                self._backlog += 1  # every worker is busy: the first one free takes it
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name=self.name, daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody claimed this worker: it may end
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # a job was claimed for it and is on its way
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            try:
                job()
            except BaseException:  # noqa: BLE001, S110 - jobs report their own errors
                pass  # an interruption landing after its job: the worker lives on
            with self._lock:
                if self._backlog > 0:
                    self._backlog -= 1  # it takes a waiting job next: not idle
                else:
                    self._idle += 1

    def close(self) -> None:
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)


class Hub:
    """Runs tasks on the thread that created it; only that thread's tasks may park.

    This base hub is driven by ``step`` (``run()``'s hub in the caller's thread, a row moved to
    a thread); ``LoopHub`` is driven by an asyncio loop instead. Work arriving from other
    threads goes through the inbox, and ``_notify_threadsafe`` tells the driver."""

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
        self.running: Task | None = None  # the task whose slice runs now
        self.slice_started = 0.0
        self._slice_lock = threading.Lock()
        self._interrupting = False  # an asynchronous Stuck was sent to the running task
        self._ready: deque[tuple[greenlet.greenlet, int, Any, BaseException | None]] = deque()
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.batches = Batches(self)
        self._pool: _Workers | None = None
        self._stopping = False

    # ------------------------------------------------------------------ driving
    def _notify(self) -> None:
        """The ready queue grew (on the hub's thread); a loop-driven hub schedules a tick."""

    def _notify_threadsafe(self) -> None:
        """The inbox grew (from another thread); a loop-driven hub wakes its loop."""

    def _put(self, entry: tuple[Any, ...]) -> None:
        self._inbox.put(entry)
        self._notify_threadsafe()

    def _deliver(
        self, task: greenlet.greenlet, token: int, value: Any, error: BaseException | None
    ) -> None:
        """Resume ``task`` (parked with ``token``), from any thread."""
        if threading.get_ident() == self.thread:
            self._ready.append((task, token, value, error))
            self._notify()
        else:
            self._put((task, token, value, error))

    # ------------------------------------------------------------------ tasks
    def spawn(self, function: Callable[..., Any], *args: Any) -> Task:
        task = Task(self, function, args)
        self.live += 1
        self._ready.append((task, 0, None, None))
        self._notify()
        return task

    def spawn_helper(self, function: Callable[..., Any], *args: Any) -> Task:
        """A task that serves others (it sends their batch): not counted in ``live``."""
        task = Task(self, function, args)
        task.finished_hook = False
        self._ready.append((task, 0, None, None))
        self._notify()
        return task

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Spawn a task from any thread (the hub spawns it when it next looks at its inbox)."""
        self._put((_SPAWN, 0, (function, args), None))

    def call_soon_threadsafe(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the hub's thread, between tasks, from any thread."""
        self._put((_CALL, 0, function, None))

    def finished(self, task: Task) -> None:
        if not task.finished_hook:
            return
        self.live -= 1
        for joiner, token in task.joiners:
            self._ready.append((joiner, token, None, None))
        task.joiners.clear()
        if task.on_done is not None:
            task.on_done(task)

    def join(self, task: Task) -> Any:
        """Wait for a task and return its result or raise its error. From the hub's own
        greenlet this drives the hub; from a task it parks."""
        if not task.done:
            current = greenlet.getcurrent()
            if current is self.main:
                while not task.done:
                    self.step()
            else:
                while not task.done:
                    task.joiners.append((current, current.token))
                    self.park()
        if task.error is not None:
            raise task.error
        return task.result

    def cancel(self, task: Task, error: BaseException) -> None:
        """Make ``task`` raise ``Cancelled(error)`` where it is parked (or at its start); a
        task that is not parked now sees it at its next park only if cancelled again."""
        if task.done:
            return
        if task.token == 0:
            task.pending_error = Cancelled(error)
            return
        self._ready.append((task, task.token, None, Cancelled(error)))
        self._notify()

    # ----------------------------------------------------------------- waiting
    def park(self) -> Any:
        """Give the thread to the hub until a wake with this task's token resumes it."""
        value, error = self.main.switch()
        if error is not None:
            raise error
        return value

    def wake(self, task: greenlet.greenlet, token: int, value: Any = None) -> None:
        """Resume a task parked with ``token`` (from any thread)."""
        self._deliver(task, token, value, None)

    def suspend(self, start: Callable[[Resume], None]) -> Any:
        """Park the current task after ``start(resume)``; ``resume(value, error)`` from any
        thread resumes it (once: a second call, or one after a cancellation, is dropped)."""
        task = greenlet.getcurrent()
        token = task.token

        def resume(value: Any, error: BaseException | None) -> None:
            self._deliver(task, token, value, error)

        start(resume)
        return self.park()

    def gather(self, batcher: Batcher, items: list[Any]) -> Any:
        """Queue ``items`` to go out with other tasks' items; return this group's outcome."""
        return self.batches.gather(batcher, items)

    def ready(self, task: greenlet.greenlet, token: int, value: Any, error: Any) -> None:
        """Queue a resumption on the hub's own thread (the hub runs it next round)."""
        self._ready.append((task, token, value, error))

    def call_blocking(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking work on a worker thread; the calling task parks meanwhile."""
        task = greenlet.getcurrent()
        token = task.token
        put = self._put

        def job() -> None:
            try:
                put((task, token, function(*args, **kwargs), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                put((task, token, None, exc))

        self._submit(job)
        return self.park()

    # ----------------------------------------------------------------- the loop
    def _submit(self, job: Callable[[], None]) -> None:
        if self._pool is None:
            self._pool = _Workers(self.workers, "sglrun-hub")
        self._pool.submit(job)

    def step(self, timeout: float | None = None) -> None:
        """Run what is ready, send what is gathered, else wait (up to ``timeout`` seconds)
        for a worker's answer, a posted task or a wake from another thread."""
        self._take_inbox(block=False)
        if self._ready:
            self._run_ready()
            self.batches.flush(force=False)
            return
        self.batches.flush(force=True)
        if self._ready:
            return
        held = self.batches.held_until
        if held is not None:  # a held batch goes when its wait is over, answer or not
            left = max(0.0, held - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        self._take_inbox(block=True, timeout=timeout)

    def _run_ready(self) -> None:
        ready = self._ready
        count = 0
        cpu = thread_time()  # once per round: a thread clock read is a system call
        for _ in range(len(ready)):
            target, token, value, error = ready.popleft()
            if target.dead or token != getattr(target, "token", token):
                continue  # finished, or a stale wake for a park it has left
            if isinstance(target, Task):
                target.token += 1
                self.running = target
            started = self.slice_started = perf_counter()
            try:
                target.switch((value, error))
            except Stuck:
                pass  # an interruption that arrived just after the slice ended: harmless
            self._end_slice()
            spent = perf_counter() - started
            # Wall time the task kept the thread without using it: blocked in its own code
            # (computing, garbage collection included, is not blocking). The CPU time of the
            # whole round so far is subtracted, so this never overstates the blocking.
            if spent > self.slow_slice:
                blocked = spent - (thread_time() - cpu)
                if blocked > self.slow_slice:
                    group = getattr(target, "group", None)
                    (group or self).note_blocked(blocked)
            count += 1
            if count % 16 == 0:
                self.batches.flush(force=False)

    def _end_slice(self) -> None:
        """No task runs now; an interruption sent for the slice that just ended and not yet
        delivered is withdrawn, so it can never land in another task."""
        while True:
            try:
                with self._slice_lock:
                    self.running = None
                    if self._interrupting:
                        _set_async_exc(self.thread, None)
                        self._interrupting = False
                return
            except Stuck:
                continue  # delivered here, between the slice and the lock: try again

    def interrupt_overdue(self, now: float) -> bool:
        """From a watchdog thread: if the running task is past its deadline, raise ``Stuck``
        in it (it is computing without parking, so nothing else can reach it)."""
        with self._slice_lock:
            task = self.running
            deadline = task.deadline if task is not None else None
            if task is None or deadline is None or now < deadline or self._interrupting:
                return False
            self._interrupting = True
            task.deadline = None  # once per task
            _set_async_exc(self.thread, Stuck)
            return True

    def note_blocked(self, blocked: float) -> None:
        """A slice of a task of no batch blocked the hub for ``blocked`` seconds."""
        if self.slow_seen:
            return
        self.blocked += blocked
        share = self.blocked / max(perf_counter() - self._started, 1e-9)
        if self.blocked > BLOCKED_LIMIT and share > BLOCKED_SHARE:
            self.slow_seen = True
            if self.on_slow is not None:
                self.on_slow(self.blocked)

    def _take_inbox(self, *, block: bool, timeout: float | None = None) -> None:
        inbox = self._inbox
        while True:
            try:
                entry = inbox.get(block, timeout) if block else inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            target, token, value, error = entry
            if isinstance(target, Pending):  # a batch came back: one outcome per task
                self.batches.returned(target, value, error)
            elif target is _SPAWN:
                self.spawn(value[0], *value[1])
            elif target is _CALL:
                value()
            elif target is not None:
                self._ready.append((target, token, value, error))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in ``thread`` at its next bytecode (None: withdraw a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(exc) if exc is not None else None
    )
