"""Coroutines on the process's I/O loop (``sglrun.lang.loop_hub``), waited for from anywhere.

Why: a request through urllib3 costs about 0.3 ms of client CPU, and a hundred requests in flight
need a hundred threads fighting for the GIL (measured here: about 0.9 ms per request at 96 in
flight); aiohttp on one event loop costs about 0.09 ms. A program on a hub parks while its
request runs on the loop (``sglrun.lang.hub.wait_for``); on the I/O thread's own hub (batches)
nothing crosses a thread at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sglrun.lang.hub import Resume, current_task, wait_for
from sglrun.lang.loop_hub import on_io_thread, shared_loop

__all__ = ["on_io_thread", "run_async", "spawn_async"]

T = TypeVar("T")


def spawn_async(factory: Callable[[], Awaitable[T]], resume: Resume) -> Callable[[], None]:
    """Start ``factory()`` on the I/O loop; ``resume(result, error)`` when it ends. Returns a
    function that cancels it (from any thread)."""
    loop = shared_loop()
    holder: list[asyncio.Future[Any]] = []

    def begin() -> None:
        future = asyncio.ensure_future(factory())
        holder.append(future)
        future.add_done_callback(lambda done: resume(*_outcome(done)))

    here = on_io_thread()
    if here:
        begin()
    else:
        loop.call_soon_threadsafe(begin)

    def cancel() -> None:
        if on_io_thread():
            if holder:
                holder[0].cancel()
        else:
            loop.call_soon_threadsafe(lambda: holder and holder[0].cancel())

    return cancel


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` on the I/O loop and wait for it: a hub task parks, another thread
    blocks. Never from the I/O loop's own code outside a task (it would wait for itself)."""
    if on_io_thread() and current_task() is None:
        raise RuntimeError("run_async called from the I/O loop itself")
    return wait_for(lambda resume: spawn_async(factory, resume))  # type: ignore[arg-type,no-any-return]


def _outcome(future: asyncio.Future[Any]) -> tuple[Any, BaseException | None]:
    if future.cancelled():
        return None, asyncio.CancelledError("the request was cancelled")
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)
