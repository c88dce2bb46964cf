"""The process's one I/O thread: an asyncio loop, and the hub that batches run on.

Why one thread: a program waiting for a server, the request itself (aiohttp on this loop) and
the batch it may travel in then never cross a thread. Measured here against a server answering
in 50 ms with 96 programs in flight: with the programs on a hub thread of their own and the
requests on this loop, every request waited about 10 ms for the two threads to hand over the
GIL (and each cost ~0.45 ms of CPU); in one thread a request costs about 0.15 ms.

Batches (``run_batch``, ``sglrun batch``) run their programs as tasks of ``shared_hub()``; a
single ``run()`` keeps the caller's thread (as SGLang does) on a hub of its own. The thread
starts on first use, and again in a forked child (a loop cannot cross a fork).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from sglrun.lang.hub import Hub, Stuck

__all__ = ["LoopHub", "on_io_thread", "shared_hub", "shared_loop"]

logger = logging.getLogger(__name__)

HUB_WORKERS = 256  # threads for blocking backend calls (an engine, a program's own I/O)

_lock = threading.Lock()
_current: tuple[int, asyncio.AbstractEventLoop, LoopHub] | None = None  # (pid, loop, hub)


class LoopHub(Hub):
    """A hub driven by an asyncio loop in its own thread: a tick runs when tasks are ready."""

    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int) -> None:
        super().__init__(workers)  # made on the loop's thread: ``main`` is its greenlet
        self.loop = loop
        self._tick_scheduled = False
        self._woken = False  # a wake from another thread is on its way
        self._timer_set = False  # a tick is due for a held batch

    def _notify(self) -> None:
        if not self._tick_scheduled:
            self._tick_scheduled = True
            self.loop.call_soon(self._tick)

    def _notify_threadsafe(self) -> None:
        if not self._woken:
            self._woken = True
            self.loop.call_soon_threadsafe(self._wake_tick)

    def _wake_tick(self) -> None:
        self._woken = False  # before reading the inbox: a later put wakes again
        self._tick()

    def _tick(self) -> None:
        self._tick_scheduled = False
        self._take_inbox(block=False)
        if self._ready:
            self._run_ready()
            self.batches.flush(force=False)
        if not self._ready:
            self.batches.flush(force=True)  # nothing else to run: send what is gathered
            held = self.batches.held_until
            if held is not None and not self._timer_set:  # it goes then, answer or not
                self._timer_set = True
                self.loop.call_at(self.loop.time() + max(0.0, held - time.monotonic()),
                                  self._held_tick)  # fmt: skip
        if self._ready:
            self._notify()

    def _held_tick(self) -> None:
        self._timer_set = False
        self._tick()

    def step(self, timeout: float | None = None) -> None:
        raise RuntimeError("a loop hub runs by itself; park or post instead")


def _serve(loop: asyncio.AbstractEventLoop, started: threading.Event, box: list[Any]) -> None:
    asyncio.set_event_loop(loop)
    box.append(LoopHub(loop, HUB_WORKERS))
    loop.set_exception_handler(_quiet)
    loop.call_soon(started.set)
    while True:
        try:
            loop.run_forever()
            return
        except Stuck:  # an interruption that landed in the loop's own code: keep serving
            continue


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Unclosed sessions at exit and callbacks failing after a cancel: debug, not stderr."""
    logger.debug("asyncio: %s", context.get("message"), exc_info=context.get("exception"))


def _start() -> tuple[int, asyncio.AbstractEventLoop, LoopHub]:
    global _current
    pid = os.getpid()
    current = _current
    if current is not None and current[0] == pid and not current[1].is_closed():
        return current
    with _lock:
        if _current is None or _current[0] != pid or _current[1].is_closed():
            loop = asyncio.new_event_loop()
            started = threading.Event()
            box: list[Any] = []
            thread = threading.Thread(
                target=_serve, args=(loop, started, box), name="sglrun-io", daemon=True
            )
            thread.start()
            started.wait()
            _current = (pid, loop, box[0])
        return _current


def shared_loop() -> asyncio.AbstractEventLoop:
    """The I/O thread's asyncio loop (started now if this process has none)."""
    return _start()[1]


def shared_hub() -> LoopHub:
    """The hub on the I/O thread, which batches run on."""
    return _start()[2]


def on_io_thread() -> bool:
    current = _current
    return current is not None and current[2].thread == threading.get_ident()
