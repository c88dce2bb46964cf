"""One scheduler for every batch: ``run_batch``, ``sglrun batch`` and nested batches.

At most ``concurrency`` programs are in flight, and a program that finishes frees its slot at
once: a slow row delays only itself, never the start of the rows after it. Order is not the
scheduler's business: it hands out results as they finish (``Finished.index`` says which row),
and each caller puts them back in order with a window of its own, bounded by memory.

Programs run as tasks of the I/O thread's hub (``sglrun.lang.loop_hub``), driven by one more
task of that hub (the batch's driver); the caller's thread only receives finished rows. A
batch inside a program drives itself on the hub already running it. Blocking backend calls
run on the hub's worker threads. Once programs block the hub in their own code, the rows not
yet started run on threads instead, one private hub per row.

A row may have a time limit (``row_timeout``): past it, a row parked on the model is cancelled
where it waits and finishes with ``RowTimeout``; a row stuck computing is interrupted by a
watchdog (``Hub.interrupt_overdue``); a row on a fallback thread is abandoned (its late result
dropped, the thread asked to stop and counted in ``left_behind`` while it lives on).
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sglrun.errors import RowTimeout
from sglrun.lang.hub import (
    BLOCKED_LIMIT,
    BLOCKED_SHARE,
    Hub,
    Task,
    _set_async_exc,
    current_task,
    report_blocking,
)
from sglrun.lang.loop_hub import shared_hub

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Feed",
    "Finished",
    "InOrder",
    "Scheduler",
    "auto_concurrency",
    "fewer_collections",
    "run_on_own_hub",
]

DEFAULT_CONCURRENCY = 96  # what SGLang's own run_batch uses on a machine this size
BURST_LIMIT = 64  # finished rows the hub hands over at most in one crossing
TAKEN_EVERY = 16  # rows the caller takes before it hands their slots back (else when idle)
IDLE_EVERY = 256  # rows the caller takes at most between two ``on_idle`` calls
_POLL = 0.2  # seconds between checks of the stop event and of deadlines
_END = object()


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
    stdin) never holds up the programs in flight. ``error`` is what the source raised.

    The reader and the hub cross as rarely as they can: the hub is told of a new item only
    when it found none waiting (``poll`` came back empty), and a full buffer lets the reader
    go on only once it is down to half, not after every item taken. Woken item by item, the
    two threads traded the GIL for every row."""

    def __init__(self, items: Iterable[Any], capacity: int = 256) -> None:
        self._items = items
        self._capacity = max(1, capacity)
        self._low = self._capacity // 2
        self._buffer: deque[Any] = deque()
        self._lock = threading.Lock()
        self._space = threading.Event()
        self._space.set()
        self._wanted = False  # the hub found the buffer empty: tell it of the next item
        self._read_all = False
        self.error: BaseException | None = None
        self.ended = False
        self._notify: Callable[[], None] = lambda: None

    def start(self, notify: Callable[[], None]) -> None:
        self._notify = notify
        threading.Thread(target=self._read, name="sglrun-feed", daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self._items:
                with self._lock:
                    self._buffer.append(item)
                    full = len(self._buffer) >= self._capacity
                    if full:
                        self._space.clear()
                    wanted, self._wanted = self._wanted, False
                if wanted:
                    self._notify()
                if full:
                    self._space.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by the scheduler's caller
            self.error = exc
        with self._lock:
            self._read_all = True
        self._notify()

    def poll(self) -> Any:
        """The next item, ``EMPTY`` if none is ready, or raises StopIteration at the end."""
        if self.ended:
            raise StopIteration
        with self._lock:
            if self._buffer:
                item = self._buffer.popleft()
                if len(self._buffer) <= self._low and not self._space.is_set():
                    self._space.set()
                return item
            if self._read_all:
                self.ended = True
                raise StopIteration
            self._wanted = True
            return EMPTY


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
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
        self.concurrency = concurrency
        self.name = name
        self.row_timeout = row_timeout
        self.abandoned = 0  # rows still running when the run ended early
        self.left_behind = 0  # fallback threads of timed-out rows still alive at the end
        self.moved_to_threads = False

    def imap(
        self,
        function: Callable[[Any], Any],
        items: Iterable[Any] | Feed,
        *,
        stop: threading.Event | None = None,
        grace: float = 5.0,
        admit: Callable[[int], bool] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> Generator[Finished, None, None]:
        """Run ``function(item)`` for every item; yield each ``Finished`` as it finishes.

        ``admit(index)`` may hold back new rows (an output window that is full); it is
        called on the hub's thread. Once ``stop`` is set no row starts; the rows in flight get
        ``grace`` seconds, then the rest are abandoned (``self.abandoned``) and the iteration
        ends. ``on_idle()`` runs on the caller's thread whenever it has taken every row
        finished so far (and at least every ``IDLE_EVERY`` rows): a writer flushes there."""
        with fewer_collections():
            outer = current_task()
            if outer is not None:  # a batch inside a program: drive it right here
                run = _Run(self, outer.hub, function, items, stop, grace, admit)
                for finished in run.loop():
                    yield finished
                    if on_idle is not None:
                        on_idle()
                return
            yield from self._on_shared_hub(function, items, stop, grace, admit, on_idle)

    def _on_shared_hub(
        self,
        function: Callable[[Any], Any],
        items: Iterable[Any] | Feed,
        stop: threading.Event | None,
        grace: float,
        admit: Callable[[int], bool] | None,
        on_idle: Callable[[], None] | None,
    ) -> Iterator[Finished]:
        """The rows cross from the hub's thread to the caller's in bursts: every row that
        finished by the time the batch's loop parks goes over as one list, and the caller
        hands back the slots of the rows it took in one call. Crossing one row at a time,
        each crossing woke the other thread and the two traded the GIL (measured: 20,000
        rows of the benchmark's program on the fake backend took 5.3-5.4 s that way, 3.9-5.0
        s in bursts)."""
        hub = shared_hub()
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        run = _Run(self, hub, function, items, stop, grace, admit, results=results)

        def drive() -> None:
            try:
                for finished in run.loop():
                    run.burst.append(finished)
                    if len(run.burst) >= BURST_LIMIT:
                        run.send_burst()
            except BaseException as exc:  # noqa: BLE001 - a bug in the loop: the caller sees it
                run.send_burst()
                results.put(exc)
            finally:
                run.send_burst()
                results.put(_END)

        hub.post(drive)
        watchdog = _Watchdog(hub) if self.row_timeout is not None else None
        taken = since_idle = 0
        try:
            while True:
                try:
                    item = results.get_nowait()
                except queue.Empty:
                    if taken:
                        run.taken(taken)
                        taken = 0
                    if on_idle is not None:
                        on_idle()
                    since_idle = 0
                    item = results.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                for finished in item:
                    yield finished
                    taken += 1  # the caller is done with it (written): its slot is free
                    since_idle += 1
                    if taken >= TAKEN_EVERY:
                        run.taken(taken)
                        taken = 0
                    if since_idle >= IDLE_EVERY and on_idle is not None:
                        on_idle()
                        since_idle = 0
        finally:
            if watchdog is not None:
                watchdog.stop()
            run.abandon()


class _Run:
    """The state of one ``Scheduler.imap``: admission, slots, deadlines, results."""

    def __init__(
        self,
        scheduler: Scheduler,
        hub: Hub,
        function: Callable[[Any], Any],
        items: Iterable[Any] | Feed,
        stop: threading.Event | None,
        grace: float,
        admit: Callable[[int], bool] | None,
        *,
        results: queue.SimpleQueue[Any] | None = None,
    ) -> None:
        self.s = scheduler
        self.hub = hub
        self.function = function
        self.feed = items if isinstance(items, Feed) else None
        self.items = None if isinstance(items, Feed) else iter(items)
        self.stop = stop
        self.grace = grace
        self.admit = admit
        self.results = results  # the caller's queue (None: the caller drives the loop)
        self.running: dict[int, _Slot] = {}
        self.done: deque[Finished] = deque()
        self.next_index = 0
        self.exhausted = False
        self.me: Task | None = None
        self.parked = False  # the loop (a task) waits to be poked
        self.stop_deadline: float | None = None
        self.unread = 0  # yielded to the caller's queue and not taken yet
        self._unread_lock = threading.Lock()
        self.burst: list[Finished] = []  # finished, not yet handed to the caller's queue
        self.abandoned = False
        self._left: list[threading.Thread] = []
        # Time this batch's programs kept the hub blocked in their own code (``note_blocked``);
        # once it is too much, the rows not yet started run on threads.
        self.blocked = 0.0
        self.slow_seen = False
        self._began = time.monotonic()
        self._report = report_blocking(scheduler.name)

    def note_blocked(self, seconds: float) -> None:
        """Called by the hub for a slice of one of this batch's tasks that blocked."""
        self.blocked += seconds
        share = self.blocked / max(time.monotonic() - self._began, 1e-9)
        if not self.slow_seen and self.blocked > BLOCKED_LIMIT and share > BLOCKED_SHARE:
            self.slow_seen = True
            self._report(self.blocked)

    # ------------------------------------------------------------------ loop
    def loop(self) -> Iterator[Finished]:
        self.me = current_task()
        if self.feed is not None:
            self.feed.start(lambda: self.hub.call_soon_threadsafe(self.poke))
        try:
            yield from self._loop()
        finally:
            self.s.abandoned = len(self.running)  # still running: the run ended early
            self.s.left_behind = sum(1 for thread in self._left if thread.is_alive())

    def _loop(self) -> Iterator[Finished]:
        while not self.abandoned:
            self._admit()
            while self.done:
                if self.results is not None:
                    with self._unread_lock:
                        self.unread += 1
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
        return self.abandoned or (self.stop is not None and self.stop.is_set())

    def _admit(self) -> None:
        s = self.s
        # A row holds its slot until the caller has taken its result: rows read, running and
        # finished-but-unwritten stay within ``concurrency`` (plus the feed's few).
        while (
            len(self.running) + len(self.done) + self.unread < s.concurrency
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
        if not self.slow_seen:
            task = self.hub.spawn(self.function, item)
            task.group = self
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
        """Something changed: resume the loop if it is parked."""
        if self.parked and self.me is not None:
            self.parked = False
            self.hub.wake(self.me, self.me.token)

    def send_burst(self) -> None:
        """Hand the rows finished so far to the caller's queue, as one list."""
        if self.burst and self.results is not None:
            self.results.put(self.burst)
            self.burst = []

    def taken(self, count: int = 1) -> None:
        """The caller took ``count`` finished rows from its queue (from its own thread)."""
        with self._unread_lock:
            self.unread -= count
            freed = len(self.running) + len(self.done) + self.unread < self.s.concurrency
        if freed and self.parked:
            self.hub.call_soon_threadsafe(self.poke)

    def abandon(self) -> None:
        """The caller stopped reading (done, or interrupted): the loop ends, rows in flight
        are left to finish on their own and their results dropped."""
        if not self.abandoned:
            self.abandoned = True
            self.hub.call_soon_threadsafe(self.poke)

    def _wait(self) -> None:
        self.send_burst()  # nothing more finishes before the loop runs again
        timed = self.stop is not None or self.s.row_timeout is not None
        handle = None
        loop = getattr(self.hub, "loop", None)
        if timed and loop is not None:
            handle = loop.call_later(_POLL, self.poke)
        self.parked = True
        try:
            self.hub.park()
        finally:
            self.parked = False
            if handle is not None:
                handle.cancel()

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
                slot.cancelled = True
                self.hub.cancel(slot.task, error)  # again each round until it ends
            elif slot.thread is not None:
                self._abandon_thread(slot)
                self._finish(slot, None, error)

    def _abandon_thread(self, slot: _Slot) -> None:
        thread = slot.thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return
        _set_async_exc(thread.ident, _ThreadTimeout)
        self._left.append(thread)


class _ThreadTimeout(BaseException):
    """Raised asynchronously in a fallback thread whose row timed out."""


class _Watchdog:
    """Interrupts a task stuck computing past its deadline on the hub (which nothing on the
    hub itself can do, since the stuck task holds the hub's thread)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="sglrun-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL):
            self.hub.interrupt_overdue(time.monotonic())

    def stop(self) -> None:
        self._stop.set()


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
