"""``StateSync``: who waits for what on one program state.

A program's own task writes its state; other tasks (a program reading a fork's variable),
other threads (a consumer of ``text_iter``) read it. Readers wait on one condition until the
value they want is produced, the program ends or fails. A task on a hub parks instead of
blocking its thread (so the hub can run the writer), and a forked state queues its
expressions and drains them in a task of its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import greenlet

from sglrun.errors import VariableNotProducedError
from sglrun.lang.backend import INCREMENTAL_META_KEYS
from sglrun.lang.frame import Frame
from sglrun.lang.hub import Task, current_hub, current_task

__all__ = ["StateSync"]


class StateSync:
    """The waiting, parking and streaming of one state (``frame``)."""

    def __init__(self, frame: Frame, *, readers_wait: bool) -> None:
        self.frame = frame
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        # A state read while its program runs (``run(stream=True)``) is live until the
        # program returns; readers of a missing variable wait for it meanwhile.
        self.finished = not readers_wait
        # The greenlet running the program itself: it produces the variables, so it must
        # never wait for one (it would wait for itself).
        self.owner: greenlet.greenlet | None = None
        self.pending: set[str] = set()  # variables queued expressions will produce
        self.streaming: set[str] = set()  # variables being streamed into
        self._waiters: list[tuple[Task, int]] = []
        self._queue: deque[Any] = deque()
        self._busy = False
        self.drainer: Task | None = None  # the task draining a forked state's queue

    # ------------------------------------------------------------------ waiting
    def wait(self) -> None:
        """Wait (holding ``cond``) for a notify: a hub task parks, a thread blocks."""
        task = current_task()
        if task is None:
            self.cond.wait()
            return
        self._waiters.append((task, task.token))
        self.cond.release()  # never park holding a lock another task may need
        try:
            task.hub.park()
        finally:
            self.cond.acquire()

    def notify(self) -> None:
        """Wake every reader (holding ``cond``)."""
        self.cond.notify_all()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter, token in waiters:
                waiter.hub.wake(waiter, token)

    # ------------------------------------------------------------------ the queue
    def enqueue(self, expr: Any, names: list[str], run: Callable[[Any], None]) -> None:
        """A forked state's expression: queued, then run by the state's drainer task (on the
        hub running the caller, else right here)."""
        with self.cond:
            self.pending.update(names)
            self._queue.append(expr)
            if self._busy:
                return
            self._busy = True
        hub = current_hub()
        if hub is None:  # a fork appended to outside any program: run it now, here
            self._drain(run)
        else:
            self.drainer = hub.spawn(self._drain, run)

    def _drain(self, run: Callable[[Any], None]) -> None:
        drained = False
        try:
            while True:
                with self.cond:
                    if not self._queue:
                        self._busy = False
                        self.notify()
                        drained = True
                        return
                    expr = self._queue.popleft()
                if self.error is None:
                    run(expr)
        finally:
            if not drained:  # cancelled: nothing more runs, and nobody waits for it
                with self.cond:
                    self._queue.clear()
                    self._busy = False
                    self.notify()

    def idle(self) -> None:
        """Wait until every queued expression has run."""
        with self.cond:
            while self._busy:
                self.wait()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self._queue.clear()
            self.pending.clear()
            self.streaming.clear()
            self.notify()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.notify()

    # ------------------------------------------------------------------ variables
    def _still_coming(self, name: str) -> bool:
        if self.error is not None:
            return False
        if greenlet.getcurrent() is self.owner:
            return False
        if name in self.streaming:
            return True
        if name in self.frame.variables:
            return False
        return name in self.pending or not self.finished

    def get(self, name: str) -> Any:
        with self.cond:
            while self._still_coming(name):
                self.wait()
            variables = self.frame.variables
            if name in variables and name not in self.streaming:
                return variables[name]
            raise VariableNotProducedError(name, self.error)

    def get_meta(self, name: str) -> Any:
        with self.cond:
            while self._still_coming(name):
                self.wait()
            return self.frame.meta_info.get(name)

    def produce(self, name: str | None, value: Any, meta: Any = None) -> None:
        """Write a variable (and its meta info) and wake whoever waits for it."""
        if name is None:
            return
        with self.cond:
            self.frame.variables[name] = value
            if meta is not None:
                self.frame.meta_info[name] = meta
            self.pending.discard(name)
            self.streaming.discard(name)
            self.notify()

    def begin_stream(self, name: str | None) -> None:
        if name is None:
            return
        with self.cond:
            self.frame.variables[name] = ""
            self.streaming.add(name)

    def stream_piece(self, name: str | None, piece: str, meta: dict[str, Any] | None) -> None:
        """A streamed piece of text (from any thread): into the text and the variable; its
        meta info (``ChunkCallback``) into the variable's meta so far."""
        with self.cond:
            self.frame.text += piece
            if name is not None:
                self.frame.variables[name] += piece
                if meta:
                    so_far = self.frame.meta_info.setdefault(name, {})
                    for key, value in meta.items():
                        if key in INCREMENTAL_META_KEYS:
                            so_far.setdefault(key, []).extend(value)
                        else:
                            so_far[key] = value
            self.notify()

    def merge(self, values: dict[str, Any], metas: dict[str, Any]) -> None:
        """Append forks' values to this state's list variables (``join``), under its lock."""
        with self.cond:
            for name, value in values.items():
                self.frame.variables.setdefault(name, []).append(value)
                if name in metas:
                    self.frame.meta_info.setdefault(name, []).append(metas[name])
            self.notify()

    # ------------------------------------------------------------------ streaming readers
    def wait_for_change(self, seen: int, var: str | None) -> tuple[str, bool]:
        """Block until the text (or ``var``) grows past ``seen``; return the new piece and
        whether nothing more will come."""
        with self.cond:
            while True:
                current = self._current(var)
                done = self._done(var)
                if len(current) > seen or done:
                    return current[seen:], done
                self.wait()

    def wait_for_piece(
        self, seen: int, var: str | None, taken: dict[str, int] | None
    ) -> tuple[str, bool, dict[str, Any] | None]:
        """``wait_for_change``, and with ``taken`` (a reader's count of incremental meta
        entries already handed out, updated here) the meta info of ``var`` so far, whose
        incremental keys hold only the new entries."""
        piece, done = self.wait_for_change(seen, var)
        if taken is None or var is None:
            return piece, done, None
        with self.cond:
            so_far = self.frame.meta_info.get(var)
            if not isinstance(so_far, dict):
                return piece, done, None
            meta = dict(so_far)
            if piece:  # entries without text wait for the next piece (as SGLang merges them)
                for key in INCREMENTAL_META_KEYS:
                    if isinstance(so_far.get(key), list):
                        meta[key] = so_far[key][taken.get(key, 0) :]
                        taken[key] = len(so_far[key])
            return piece, done, meta

    def _current(self, var: str | None) -> str:
        if var is None:
            return self.frame.text
        value = self.frame.variables.get(var, "")
        return value if isinstance(value, str) else str(value)

    def _done(self, var: str | None) -> bool:
        if self.error is not None or self.finished:
            return True
        if var is None:
            return False
        return var in self.frame.variables and var not in self.streaming
