"""Running programs: one (``run``), many in parallel (``run_batch``), or none at all (dry run)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import greenlet

from sglrun.lang.global_config import global_config
from sglrun.lang.hub import Cancelled, current_hub
from sglrun.lang.interpreter import Executor
from sglrun.lang.ir import SamplingParams
from sglrun.lang.scheduler import InOrder, Scheduler, auto_concurrency, run_on_own_hub
from sglrun.lang.state import ProgramState

if TYPE_CHECKING:
    from collections.abc import Callable

    from sglrun.lang.backend import Backend
    from sglrun.lang.call_cache import CallCache
    from sglrun.lang.chat_template import ChatTemplate
    from sglrun.lang.function import SglFunction

__all__ = ["execute", "new_state", "run_program", "run_program_batch"]

REORDER_WINDOW = 4096  # generator-style run_batch: finished states held to keep the order


def new_state(
    function: SglFunction,
    backend: Backend,
    arguments: dict[str, Any],
    defaults: SamplingParams,
    *,
    stream: bool = False,
    readers_wait: bool | None = None,
    chat_template: ChatTemplate | None = None,
    cache: CallCache | None = None,
) -> ProgramState:
    """A fresh state for ``function``. ``stream``: gens stream their text into it as it
    comes. ``readers_wait`` (default: as ``stream``): readers in other threads wait while the
    program runs (``run(stream=True)``); a live display only polls, and must not make a
    program that reads a variable it never produced wait for itself."""
    executor = Executor(
        backend,
        arguments,
        defaults,
        chat_template or backend.get_chat_template(),
        stream=stream,
        readers_wait=readers_wait,
        num_api_spec_tokens=function.num_api_spec_tokens,
        cache=cache,
    )
    return ProgramState(executor)


def execute(function: SglFunction, state: ProgramState, arguments: dict[str, Any]) -> None:
    """Call the program; its own exception is kept in ``state.error()`` (and as the
    executor's ``body_error``: ``run()`` raises it, as SGLang does), never raised here. Its
    forks end with it: waited for when it returns, cancelled when it fails or is cancelled."""
    executor = state.executor
    current = executor.sync.owner = greenlet.getcurrent()
    current.call_cache = executor.cache  # a program this one runs is part of its run
    try:
        state.ret_value = function.call(state, arguments)
    except Cancelled as cancelled:  # a time limit: record it, stop the forks, do not wait
        executor.cancel(cancelled.error)
        executor.end(wait=False)
        return
    except Exception as exc:
        executor.fail(exc)
        executor.cancel(exc)
        executor.body_error = exc
    except BaseException:  # the task itself is being killed: unwind without waiting
        executor.end(wait=False)
        raise
    try:
        executor.end()
    except Cancelled as cancelled:  # cancelled while waiting for its forks
        executor.cancel(cancelled.error)
        executor.end(wait=False)


def run_program(
    function: SglFunction,
    backend: Backend | None,
    arguments: dict[str, Any],
    defaults: SamplingParams,
    *,
    stream: bool = False,
    cache: Any = None,
) -> ProgramState:
    """One program: on the hub running the caller (a program inside a program), else on a
    hub of its own in this thread, or in a thread of its own when streaming."""
    backend = global_config.resolve_backend(backend)
    calls = _run_cache(cache)
    state = new_state(function, backend, arguments, defaults, stream=stream, cache=calls)
    # A program run by another shares its run's cache, and that run counts the calls.
    owns_cache = calls is not None and calls is not getattr(
        greenlet.getcurrent(), "call_cache", None
    )
    run = _execute_counted if owns_cache else execute
    if stream:
        worker = threading.Thread(
            target=run_on_own_hub,
            args=(run, function, state, arguments),
            name="sglrun-stream",
            daemon=True,
        )
        worker.start()
        return state
    hub = current_hub()
    if hub is not None:
        hub.join(hub.spawn(run, function, state, arguments))
    else:
        run_on_own_hub(run, function, state, arguments)
    return state


def _execute_counted(function: SglFunction, state: ProgramState, args: dict[str, Any]) -> None:
    """``execute``, then the run's cache counts go to the cache it came from."""
    try:
        execute(function, state, args)
    finally:
        if state.executor.cache is not None:
            state.executor.cache.finish()


def _run_cache(cache: Any) -> CallCache | None:
    """The run's call cache (``lang/call_cache.py``); none in a dry run."""
    if global_config.in_dry_run():
        return None
    from sglrun.lang.call_cache import resolve_cache

    return resolve_cache(cache, global_config.call_cache)


def concurrency_for(num_threads: str | int, backend: Backend, rows: int) -> int:
    """``num_threads``: an int, or ``"auto"`` (the backend's own limit, else the default)."""
    if num_threads == "auto":
        return auto_concurrency(backend, rows)
    return max(1, min(int(num_threads), rows))


def run_program_batch(
    function: SglFunction,
    backend: Backend | None,
    rows: list[dict[str, Any]],
    defaults: SamplingParams,
    *,
    num_threads: str | int = "auto",
    progress_bar: bool = False,
    generator_style: bool = False,
    cache: Any = None,
) -> list[ProgramState] | Iterator[ProgramState]:
    backend = global_config.resolve_backend(backend)
    calls = _run_cache(cache)
    if calls is not None:
        calls.identity(backend)  # a model file is hashed here, not on the batch's thread
    if not rows:
        return iter(()) if generator_style else []
    if global_config.enable_precache_with_tracing and len(rows) > 1:
        from sglrun.lang.tracing import shared_prefix

        prefix = shared_prefix(function, rows[:2], backend.get_chat_template())
        if len(prefix) > 64:
            backend.cache_prefix(prefix)
    concurrency = concurrency_for(num_threads, backend, len(rows))
    progress = global_config.batch_progress if progress_bar else None
    states = _run_rows(function, backend, rows, defaults, concurrency, progress, calls)
    return states if generator_style else list(states)


def _run_rows(
    function: SglFunction,
    backend: Backend,
    rows: list[dict[str, Any]],
    defaults: SamplingParams,
    concurrency: int,
    progress: Callable[[int, str], AbstractContextManager[Callable[[ProgramState], None]]] | None,
    cache: CallCache | None = None,
) -> Iterator[ProgramState]:
    """Yield states in input order; the scheduler keeps ``concurrency`` programs in flight."""

    def one(arguments: dict[str, Any]) -> ProgramState:
        state = new_state(function, backend, arguments, defaults, cache=cache)
        execute(function, state, arguments)
        return state

    scheduler = Scheduler(concurrency, name=f"run_batch({function.name})")
    order = InOrder()
    window = max(REORDER_WINDOW, 4 * concurrency)
    finished = scheduler.imap(one, rows, admit=lambda index: index < order.expected + window)
    bar = progress(len(rows), function.name) if progress is not None else None
    advance = bar.__enter__() if bar is not None else None
    try:
        for item in finished:
            if item.error is not None:  # execute() keeps program errors: this is a bug
                raise item.error
            if advance is not None:
                advance(item.result)
            for ready in order.push(item):
                yield ready.result
    finally:
        if cache is not None:
            cache.finish()
        finished.close()
        if bar is not None:
            bar.__exit__(None, None, None)
