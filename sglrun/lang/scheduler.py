"""One scheduler for every batch: ``run_batch``, ``sglrun batch`` and nested batches.

At most ``concurrency`` programs are in flight, and a program that finishes frees its slot at
once: a slow row delays only itself, never the start of the rows after it. Order is not the
scheduler's business: it hands out results as they finish (``Finished.index`` says which row),
and each caller puts them back in order with a window of its own, bounded by memory.

Programs run as tasks of one hub (``sglrun.lang.hub``) in the caller's thread (or of the hub
already running the caller, for a batch inside a program); their blocking backend calls run on
the hub's worker threads. Once programs block the hub in their own code, the rows not yet
started run on threads instead, one private hub per row.

A row may have a time limit (``row_timeout``): past it, a row parked on the model is cancelled
where it waits and finishes with ``RowTimeout``; a row on a fallback thread is abandoned (its
late result dropped, the thread asked to stop and counted in ``left_behind``). With
``interrupt_stuck`` (only from the main thread) a row stuck computing in pure Python is
interrupted too, by a signal whose handler checks that the overdue row is the one running.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import greenlet

from sglrun.errors import RowTimeout
from sglrun.lang.hub import Cancelled, Hub, Task, current_hub, report_blocking

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Feed",
    "Finished",
    "Scheduler",
    "auto_concurrency",
    "fewer_collections",
    "InOrder",
    "run_on_own_hub",
]

DEFAULT_CONCURRENCY = 96  # what SGLang's own run_batch uses on a machine this size
_POLL = 0.2  # seconds between checks of the stop event and of deadlines
_STUCK_SIGNAL = getattr(signal, "SIGUSR2", None)


def auto_concurrency(backend: Any, rows: int | None = None) -> int:
    """Programs in flight for ``auto``: what the backend says it serves at once (an engine's
    slots, a server's advertised limit), else ``DEFAULT_CONCURRENCY``; never more than rows."""
    hint = None
    advertised = getattr(backend, "concurrency_hint", None)
    if callable(advertised):
        try:
            hint = advertised()
        except Exception:  # an advisory number: a failing probe falls back to the default
            hint = None
    value = hint if isinstance(hint, int) and not isinstance(hint, bool) and hint >= 1 else None
    chosen = value or DEFAULT_CONCURRENCY
    return max(1, min(chosen, rows)) if rows is not None else chosen


@dataclass(slots=True)
class Finished:
    """One row's outcome: ``result`` of the function, or the ``error`` it raised."""

    index: int
    item: Any
    result: Any = None
    error: BaseException | None = None


class _Empty:
    """``Feed.poll``: nothing ready yet."""


EMPTY = _Empty()


class Feed:
    """Items read from an iterable on a thread of their own, so a slow source (a pipe on
    stdin) never holds up the programs in flight. ``error`` is what the source raised."""

    def __init__(self, items: Iterable[Any], capacity: int = 256) -> None:
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, capacity))
        self._end = object()
        self.error: BaseException | None = None
        self.ended = False
        self._notify: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None

    def start(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        self._thread = threading.Thread(target=self._read, name="sglrun-feed", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self._items:
                self._queue.put(item)
                self._notify()
        except BaseException as exc:  # noqa: BLE001 - reported by the scheduler's caller
            self.error = exc
        self._queue.put(self._end)
        self._notify()

    def poll(self) -> Any:
        """The next item, ``EMPTY`` if none is ready, or raises StopIteration at the end."""
        if self.ended:
            raise StopIteration
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return EMPTY
        if item is self._end:
            self.ended = True
            raise StopIteration
        return item


class _Slot:
    __slots__ = ("index", "item", "started", "task", "thread", "cancelled")

    def __init__(self, index: int, item: Any) -> None:
        self.index = index
        self.item = item
        self.started = time.monotonic()
        self.task: Task | None = None
        self.thread: threading.Thread | None = None
        self.cancelled = False


class Scheduler:
    """Runs a function over many items with at most ``concurrency`` in flight."""

    def __init__(
        self,
        concurrency: int,
        *,
        name: str = "batch",
        row_timeout: float | None = None,
        interrupt_stuck: bool = False,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
        self.concurrency = concurrency
        self.name = name
        self.row_timeout = row_timeout
        self.interrupt_stuck = interrupt_stuck
        self.abandoned = 0  # rows still running when a stop's grace ran out
        self.left_behind = 0  # fallback threads of timed-out rows still alive at the end
        self.timed_out = 0
        self.moved_to_threads = False

    def imap(
        self,
        function: Callable[[Any], Any],
        items: Iterable[Any] | Feed,
        *,
        stop: threading.Event | None = None,
        grace: float = 5.0,
        admit: Callable[[int], bool] | None = None,
    ) -> Iterator[Finished]:
        """Run ``function(item)`` for every item; yield each ``Finished`` as it finishes.

        ``admit(index)`` may hold back new rows (an output window that is full). Once ``stop``
        is set no row starts; the rows in flight get ``grace`` seconds, then the rest are
        abandoned (``self.abandoned``) and the iteration ends."""
        outer = current_hub()
        hub = outer or Hub(
            self.concurrency, on_slow=report_blocking(f"{self.name}")
        )
        run = _Run(self, hub, function, items, stop, grace, admit)
        try:
            with fewer_collections(), run.watching():
                yield from run.loop()
        finally:
            if outer is None:
                hub.close()


class _Run:
    """The state of one ``Scheduler.imap``."""

    def __init__(
        self,
        scheduler: Scheduler,
        hub: Hub,
        function: Callable[[Any], Any],
        items: Iterable[Any] | Feed,
        stop: threading.Event | None,
        grace: float,
        admit: Callable[[int], bool] | None,
    ) -> None:
        self.s = scheduler
        self.hub = hub
        self.function = function
        self.feed = items if isinstance(items, Feed) else None
        self.items = None if isinstance(items, Feed) else iter(items)
        self.stop = stop
        self.grace = grace
        self.admit = admit
        self.running: dict[int, _Slot] = {}
        self.done: deque[Finished] = deque()
        self.next_index = 0
        self.exhausted = False
        self.me = greenlet.getcurrent()
        self.parked = False  # the loop (a task itself, in a nested batch) waits to be poked
        self.stop_deadline: float | None = None

    # ------------------------------------------------------------------ loop
    def loop(self) -> Iterator[Finished]:
        if self.feed is not None:
            self.feed.start(lambda: self.hub.call_soon_threadsafe(self.poke))
        try:
            yield from self._loop()
        finally:
            self.s.abandoned = len(self.running)  # still running: a stop's grace ran out

    def _loop(self) -> Iterator[Finished]:
        while True:
            self._admit()
            while self.done:
                yield self.done.popleft()
                self._admit()
            if not self.running and (self.exhausted or self._stopping()):
                return
            if self._stopping():
                now = time.monotonic()
                if self.stop_deadline is None:
                    self.stop_deadline = now + self.grace
                if now >= self.stop_deadline:
                    return
            self._check_deadlines()
            self._wait()

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _admit(self) -> None:
        s = self.s
        while (
            len(self.running) < s.concurrency
            and not self.exhausted
            and not self._stopping()
            and (self.admit is None or self.admit(self.next_index))
        ):
            try:
                item = self.feed.poll() if self.feed is not None else next(self.items)  # type: ignore[arg-type]
            except StopIteration:
                self.exhausted = True
                return
            if item is EMPTY:
                return
            self._start(self.next_index, item)
            self.next_index += 1

    def _start(self, index: int, item: Any) -> None:
        slot = _Slot(index, item)
        self.running[index] = slot
        if not self.hub.slow_seen:
            task = self.hub.spawn(self.function, item)
            if self.s.row_timeout is not None:
                task.deadline = slot.started + self.s.row_timeout
            task.on_done = lambda t, slot=slot: self._finish(slot, t.result, t.error)
            slot.task = task
            return
        self.s.moved_to_threads = True
        slot.thread = threading.Thread(
            target=self._run_thread, args=(slot,), name=f"sglrun-row-{index}", daemon=True
        )
        slot.thread.start()

    def _run_thread(self, slot: _Slot) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = run_on_own_hub(self.function, slot.item)
        except _ThreadTimeout:
            return
        except BaseException as exc:  # noqa: BLE001 - reported as the row's outcome
            error = exc
        try:
            self.hub.call_soon_threadsafe(lambda: self._finish(slot, result, error))
        except _ThreadTimeout:
            return

    def _finish(self, slot: _Slot, result: Any, error: BaseException | None) -> None:
        if self.running.get(slot.index) is not slot:
            return  # timed out and reported already: a late result is dropped
        del self.running[slot.index]
        self.done.append(Finished(slot.index, slot.item, result, error))
        self.poke()

    def poke(self) -> None:
        """Something changed: resume the loop if it is a parked task (nested batch)."""
        if self.parked:
            self.parked = False
            self.hub.wake(self.me, self.me.token)

    def _wait(self) -> None:
        if self.me is self.hub.main:
            timed = self.stop is not None or self.s.row_timeout is not None
            self.hub.step(timeout=_POLL if timed else None)
            return
        self.parked = True
        try:
            self.hub.park()
        finally:
            self.parked = False

    # -------------------------------------------------------------- deadlines
    def _check_deadlines(self) -> None:
        limit = self.s.row_timeout
        if limit is None or not self.running:
            return
        now = time.monotonic()
        for slot in list(self.running.values()):
            if now - slot.started < limit:
                continue
            error = RowTimeout(f"the row ran past its time limit ({limit:g} s)")
            if slot.task is not None:
                if not slot.cancelled:
                    self.s.timed_out += 1
                slot.cancelled = True
                self.hub.cancel(slot.task, error)  # again each round until it ends
            elif slot.thread is not None:
                self.s.timed_out += 1
                self._abandon_thread(slot)
                self._finish(slot, None, error)

    def _abandon_thread(self, slot: _Slot) -> None:
        thread = slot.thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(_ThreadTimeout)
        )
        self._threads_to_count.append(thread)

    _threads_to_count: list[threading.Thread]

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While the loop runs: with ``interrupt_stuck``, a watchdog that interrupts a row
        stuck computing on the hub past its deadline; at the end, count abandoned threads."""
        self._threads_to_count = []
        watchdog = None
        if (
            self.s.interrupt_stuck
            and self.s.row_timeout is not None
            and _STUCK_SIGNAL is not None
            and self.me is self.hub.main
            and threading.current_thread() is threading.main_thread()
        ):
            watchdog = _Watchdog(self.hub)
        try:
            if watchdog is None:
                yield
            else:
                with watchdog:
                    yield
        finally:
            self.s.left_behind = sum(1 for thread in self._threads_to_count if thread.is_alive())


class _ThreadTimeout(BaseException):
    """Raised asynchronously in a fallback thread whose row timed out."""


class _Watchdog:
    """Sends the main thread a signal while the running task is past its deadline; the
    handler raises ``Cancelled(RowTimeout)`` only if that very task is the one running."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._stop = threading.Event()
        self._previous: Any = None
        self._main = threading.main_thread().ident

    def __enter__(self) -> _Watchdog:
        assert _STUCK_SIGNAL is not None
        self._previous = signal.signal(_STUCK_SIGNAL, self._handler)
        threading.Thread(target=self._watch, name="sglrun-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert _STUCK_SIGNAL is not None
        signal.signal(_STUCK_SIGNAL, self._previous or signal.SIG_DFL)

    def _overdue(self) -> Task | None:
        task = self.hub.running
        deadline = task.deadline if task is not None else None
        if task is None or deadline is None or time.monotonic() < deadline:
            return None
        return task

    def _watch(self) -> None:
        while not self._stop.wait(_POLL):
            if self._overdue() is not None and self._main is not None:
                signal.pthread_kill(self._main, _STUCK_SIGNAL)  # type: ignore[arg-type]

    def _handler(self, signum: int, frame: Any) -> None:
        task = self._overdue()
        if task is not None and greenlet.getcurrent() is task:
            task.deadline = None  # one interruption per row
            raise Cancelled(RowTimeout("the row ran past its time limit (stuck computing)"))


def run_on_own_hub(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function`` as the only task of a new hub in this thread (``run()``, a row moved
    to a thread): its forks and blocking calls work as on any hub."""
    hub = Hub(8)
    try:
        return hub.join(hub.spawn(function, *args))
    finally:
        hub.close()


class InOrder:
    """Puts finished rows back in index order; ``held`` rows wait for a lower one. Callers bound
    it by refusing new rows (``Scheduler.imap``'s ``admit``) while ``held`` is too large."""

    def __init__(self) -> None:
        self.expected = 0
        self._held: dict[int, Finished] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    def push(self, finished: Finished) -> list[Finished]:
        """Take one finished row; return the rows now ready, in order."""
        self._held[finished.index] = finished
        ready = []
        while self.expected in self._held:
            ready.append(self._held.pop(self.expected))
            self.expected += 1
        return ready

    def rest(self) -> list[Finished]:
        """What is still held (rows that will never come before it), in order."""
        ready = [self._held.pop(index) for index in sorted(self._held)]
        if ready:
            self.expected = ready[-1].index + 1
        return ready


FIRST_GC_THRESHOLD = 20_000


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Raise the garbage collector's first threshold while a batch runs, then put it back.

    A batch allocates a few dozen objects per program; with the default threshold (700
    allocations) the collector ran often enough to take half the runtime's own CPU (measured:
    0.19 vs 0.12 ms per program of the benchmark's reference program). The setting is
    process-wide, so it is restored only if nobody changed it meanwhile.
    """
    saved = gc.get_threshold()
    ours = (max(saved[0], FIRST_GC_THRESHOLD), *saved[1:])
    gc.set_threshold(*ours)
    try:
        yield
    finally:
        if gc.get_threshold() == ours:
            gc.set_threshold(*saved)
