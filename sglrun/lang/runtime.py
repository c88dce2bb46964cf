"""Running programs: one (``run``), many in parallel (``run_batch``), or none at all (dry run)."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import greenlet

from sglrun.lang.global_config import global_config
from sglrun.lang.hub import Hub, Task, current_hub, report_blocking
from sglrun.lang.interpreter import Executor
from sglrun.lang.ir import SamplingParams
from sglrun.lang.state import ProgramState

if TYPE_CHECKING:
    from sglrun.backends.base import Backend
    from sglrun.lang.chat_template import ChatTemplate
    from sglrun.lang.function import SglFunction

__all__ = ["dry_run", "fewer_collections", "run_program", "run_program_batch", "shared_prefix"]

PLACEHOLDER = "{{{name}}}"


def new_state(
    function: SglFunction,
    backend: Backend,
    arguments: dict[str, Any],
    defaults: SamplingParams,
    *,
    stream: bool = False,
    chat_template: ChatTemplate | None = None,
) -> ProgramState:
    executor = Executor(
        backend,
        arguments,
        defaults,
        chat_template or backend.get_chat_template(),
        stream=stream,
        num_api_spec_tokens=function.num_api_spec_tokens,
    )
    return ProgramState(executor)


def execute(function: SglFunction, state: ProgramState, arguments: dict[str, Any]) -> None:
    """Call the program; its own exception is kept in ``state.error()``, never raised."""
    executor = state.executor
    executor.owner = greenlet.getcurrent()
    try:
        state.ret_value = function.func(state, **arguments)
    except Exception as exc:
        executor.fail(exc)
    finally:
        executor.end()


def run_program(
    function: SglFunction,
    backend: Backend | None,
    arguments: dict[str, Any],
    defaults: SamplingParams,
    *,
    stream: bool = False,
) -> ProgramState:
    backend = global_config.resolve_backend(backend)
    state = new_state(function, backend, arguments, defaults, stream=stream)
    if stream:
        worker = threading.Thread(
            target=execute, args=(function, state, arguments), name="sglrun-stream", daemon=True
        )
        worker.start()
    else:
        execute(function, state, arguments)
    return state


def auto_threads(rows: int) -> int:
    return max(1, min(rows, max(96, (os.cpu_count() or 2) * 16)))


def run_program_batch(
    function: SglFunction,
    backend: Backend | None,
    rows: list[dict[str, Any]],
    defaults: SamplingParams,
    *,
    num_threads: str | int = "auto",
    progress_bar: bool = False,
    generator_style: bool = False,
) -> list[ProgramState] | Iterator[ProgramState]:
    backend = global_config.resolve_backend(backend)
    if not rows:
        return iter(()) if generator_style else []
    if global_config.enable_precache_with_tracing and len(rows) > 1:
        prefix = shared_prefix(function, rows[:2], backend.get_chat_template())
        if len(prefix) > 64:
            backend.cache_prefix(prefix)
    threads = auto_threads(len(rows)) if num_threads == "auto" else min(int(num_threads), len(rows))
    states = _run_rows(function, backend, rows, defaults, threads, progress_bar)
    return states if generator_style else list(states)


def _run_rows(
    function: SglFunction,
    backend: Backend,
    rows: list[dict[str, Any]],
    defaults: SamplingParams,
    threads: int,
    progress_bar: bool,
) -> Iterator[ProgramState]:
    """Yield states in input order, with at most ``threads`` programs running at once (on a
    hub when the backend is cooperative, else on threads)."""

    def one(arguments: dict[str, Any]) -> ProgramState:
        state = new_state(function, backend, arguments, defaults)
        execute(function, state, arguments)
        return state

    progress = None
    if progress_bar:
        from sglrun.cli.display import batch_progress

        progress = batch_progress(total=len(rows), description=function.name)
    advance = progress.__enter__() if progress is not None else None
    try:
        with fewer_collections():
            if threads == 1:
                for arguments in rows:
                    state = one(arguments)
                    if advance:
                        advance(state)
                    yield state
            elif backend.cooperative:
                yield from _on_hub(one, rows, threads, advance, function.name)
            else:
                yield from _on_threads(one, rows, threads, advance)
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)


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


def _on_threads(
    one: Callable[[dict[str, Any]], ProgramState],
    rows: list[dict[str, Any]],
    threads: int,
    advance: Callable[[ProgramState], None] | None,
) -> Iterator[ProgramState]:
    with ThreadPoolExecutor(threads, thread_name_prefix="sglrun-batch") as pool:
        window: deque[Future[ProgramState]] = deque()
        for arguments in rows:
            future = pool.submit(one, arguments)
            if advance:
                future.add_done_callback(lambda f: advance(f.result()))
            window.append(future)
            if len(window) >= threads * 4:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _on_hub(
    one: Callable[[dict[str, Any]], ProgramState],
    rows: list[dict[str, Any]],
    concurrency: int,
    advance: Callable[[ProgramState], None] | None,
    name: str,
) -> Iterator[ProgramState]:
    """Programs as tasks of one hub in this thread (or of the hub already running this
    program, for a batch inside a program). Once a program blocks the thread in its own code,
    the rows not yet started run on threads instead."""

    hub = current_hub()
    own_hub = hub is None
    if hub is None:
        hub = Hub(concurrency, on_slow=report_blocking(f"run_batch({name})"))
    fallback: ThreadPoolExecutor | None = None
    window: deque[Task | Future[ProgramState]] = deque()
    try:
        for arguments in rows:
            job: Task | Future[ProgramState]
            if not hub.slow_seen:
                job = hub.spawn(one, arguments)
                if advance:
                    job.on_done = lambda task: advance(task.result)
            else:
                if fallback is None:
                    fallback = ThreadPoolExecutor(concurrency, thread_name_prefix="sglrun-batch")
                job = fallback.submit(one, arguments)
                if advance:
                    job.add_done_callback(lambda f: advance(f.result()))
            window.append(job)
            if len(window) >= concurrency:
                yield hub.join(window.popleft())
        while window:
            yield hub.join(window.popleft())
        while own_hub and hub.live:  # forks a program left running
            hub.step()
    finally:
        if own_hub:
            hub.close()
        if fallback is not None:
            fallback.shutdown(wait=False)


def _template_for_dry_run() -> ChatTemplate:
    from sglrun.lang.chat_template import get_chat_template, get_chat_template_by_model_path

    if global_config.default_backend is not None:
        return global_config.default_backend.get_chat_template()
    try:
        from sglrun.backends.model_path import resolve_model_path

        return get_chat_template_by_model_path(str(resolve_model_path()))
    except Exception:
        return get_chat_template("default")


def dry_run(
    function: SglFunction,
    arguments: dict[str, Any],
    chat_template: ChatTemplate | None = None,
) -> ProgramState:
    """Run without a model: gens produce ``{name}`` placeholders, selects their first choice.
    Missing arguments become ``{param}`` placeholders too."""
    from sglrun.backends.fake import FakeBackend

    template = chat_template or _template_for_dry_run()
    backend = FakeBackend(placeholders=True, chat_template=template)
    filled = {}
    for param in function.arg_params:
        if param.name in arguments:
            filled[param.name] = arguments[param.name]
        elif param.default is not param.empty:
            filled[param.name] = param.default
        elif param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            filled[param.name] = PLACEHOLDER.format(name=param.name)
    state = new_state(function, backend, filled, SamplingParams.defaults(), chat_template=template)
    execute(function, state, filled)
    return state


def shared_prefix(
    function: SglFunction,
    rows: list[dict[str, Any]] | None = None,
    chat_template: ChatTemplate | None = None,
) -> str:
    """The prompt text every run starts with: what precedes the first argument-dependent text
    or generation, found by two dry runs."""
    if rows:
        samples = rows[:2]
    else:  # distinct markers per run: the texts part where the first argument appears
        samples = [{p.name: f"\x00{i}{p.name}" for p in function.arg_params} for i in (0, 1)]
    texts = []
    for row in samples:
        text = dry_run(function, row, chat_template).text()
        cut = text.find("{")  # a gen's dry-run placeholder: nothing after it is shared
        texts.append(text if cut < 0 else text[:cut])
    first, second = texts[0], texts[-1]
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return first[:length].split("\x00")[0]
