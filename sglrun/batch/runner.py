"""The batch runner: one program over a lazy stream of rows, one JSON record per row.

Memory does not grow with the input: rows are pulled from the reader only when a slot is free
(at most ``2 * num_threads`` in flight), each finished row is written (and flushed) at once and
its program state dropped, and the ordered emitter holds at most ``window`` finished records.
A row that fails, at conversion or in the program, becomes an error record and never stops the
batch. Interrupting (Ctrl-C or ``stop_event``) stops taking rows, gives the rows in flight a
short grace to finish, writes what finished and reports ``interrupted``; the output then holds
only whole records, so ``--resume`` can carry on from it.

No Rich here: progress and the streaming panel are callbacks the CLI supplies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sglrun.batch.readers import Row, convert_row, param_specs
from sglrun.batch.writers import OrderedEmitter, make_record
from sglrun.errors import InvalidArgumentError, SglrunError, VariableNotProducedError
from sglrun.lang.hub import report_blocking, start_hub_thread
from sglrun.lang.runtime import execute, fewer_collections, new_state

if TYPE_CHECKING:
    from sglrun.backends.base import Backend
    from sglrun.lang.function import SglFunction
    from sglrun.lang.ir import SamplingParams
    from sglrun.lang.state import ProgramState

__all__ = [
    "INCLUDE_FIELDS",
    "BatchStats",
    "StreamSink",
    "count_tokens",
    "error_info",
    "run_batch_file",
]

logger = logging.getLogger("sglrun.batch")

INCLUDE_FIELDS = ("input", "text", "messages", "meta")
_MESSAGE_LIMIT = 2000
_POLL = 0.1  # seconds between checks of the stop event while the feeder waits
_MAX_KEY_WARNINGS = 20


class StreamSink(Protocol):
    """Shows the text of rows in flight (the CLI's live panel); called from worker threads."""

    def track(self, key: int, label: str, state: ProgramState) -> None: ...

    def untrack(self, key: int) -> None: ...


@dataclass
class BatchStats:
    """Counters of one batch run; updated from worker threads under the runner's lock."""

    total: int | None = None
    read: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    in_flight: int = 0  # taken from the input, not finished (queued or running)
    running: int = 0
    abandoned: int = 0
    status: str = "running"  # then "completed", "interrupted", "read_error" or "write_error"
    write_error: BaseException | None = None  # the output broke (disk full, closed pipe)
    read_error: BaseException | None = None  # the input broke mid-way (rows before it ran)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return max(0.0, end - self.started)

    @property
    def rows_per_second(self) -> float:
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        elapsed = self.elapsed
        return self.tokens / elapsed if elapsed > 0 else 0.0


def error_info(exc: BaseException | None) -> dict[str, str] | None:
    """``{"type", "message"}`` with a one-line message; a variable that was not produced
    because something failed first reports that first failure (the useful one)."""
    if exc is None:
        return None
    seen: set[int] = set()
    while isinstance(exc, VariableNotProducedError) and exc.cause is not None:
        if id(exc) in seen:
            break
        seen.add(id(exc))
        exc = exc.cause
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    return {"type": type(exc).__name__, "message": message}


def count_tokens(meta_info: Mapping[str, Any]) -> int:
    """Generated tokens: the ``completion_tokens`` of every variable (forks give lists)."""
    total = 0
    for value in meta_info.values():
        for item in value if isinstance(value, list) else (value,):
            if not isinstance(item, Mapping):
                continue
            count = item.get("completion_tokens")
            if isinstance(count, list):
                total += sum(c for c in count if isinstance(c, int) and not isinstance(c, bool))
            elif isinstance(count, int) and not isinstance(count, bool):
                total += count
    return total


class _Sink:
    """The record sink; once closed (run over) late finishers are dropped, not written to a
    closed file."""

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self.closed = False
        self.dropped = 0

    def __call__(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self.closed:
                self.dropped += 1
                return
            self._write(record)

    def close(self) -> None:
        with self._lock:
            self.closed = True


@dataclass
class _Job:
    position: int
    row: Row


class _Batch:
    """One run's shared state: the feeder (caller's thread) and the workers (daemon threads,
    so a row abandoned after an interrupt never keeps the process alive)."""

    def __init__(
        self,
        program: SglFunction,
        *,
        backend: Backend,
        defaults: SamplingParams,
        threads: int,
        emitter: OrderedEmitter,
        sink: _Sink,
        stats: BatchStats,
        on_progress: Callable[[BatchStats], None] | None,
        include: frozenset[str],
        stream_panel: StreamSink | None,
        mapping: dict[str, str] | None,
        strict: bool,
        id_field: str | None,
        source: str,
        stop: threading.Event,
    ) -> None:
        self.program = program
        self.stop = stop
        self.backend = backend
        self.defaults = defaults
        self.emitter = emitter
        self.sink = sink
        self.stats = stats
        self.on_progress = on_progress
        self.include = include
        self.stream_panel = stream_panel
        self.mapping = mapping
        self.strict = strict
        self.id_field = id_field
        self.source = source
        self.specs = param_specs(program.func)
        self.lock = threading.Condition()
        self.threads = threads
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        # Server backends: rows run as tasks of one hub thread (no thread per row, requests
        # sent together); rows go to worker threads if programs block the hub in their code.
        self.hub = (
            start_hub_thread(threads, on_slow=report_blocking(f"batch {program.name}"))
            if backend.cooperative and threads > 1
            else None
        )
        if self.hub is None:
            self._start_workers()

    # ------------------------------------------------------------ workers
    def _start_workers(self) -> None:
        self.workers = [
            threading.Thread(target=self._work, name=f"sglrun-row-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for worker in self.workers:
            worker.start()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self._start_job(job)

    def _start_job(self, job: _Job) -> None:
        with self.lock:
            if self.stop.is_set():  # queued but not started: leave it for a resume
                self.stats.in_flight -= 1
                self.lock.notify_all()
                return
            self.stats.running += 1
        self._run_job(job)

    def _run_job(self, job: _Job) -> None:
        row = job.row
        tokens = 0
        try:
            record, tokens = self._record_for(job)
        except BaseException as exc:  # a worker must survive anything a program does
            record = make_record(row.id, {}, error_info(exc))
        failed = record.get("error") is not None
        try:
            self.emitter.emit(job.position, record)
        except Exception as exc:  # a broken output (disk full, closed pipe) stops the batch
            with self.lock:
                if self.stats.write_error is None:
                    self.stats.write_error = exc
            self.sink.close()
            self.stop.set()
        with self.lock:
            stats = self.stats
            stats.in_flight -= 1
            stats.running -= 1
            stats.done += 1
            stats.tokens += tokens
            if failed:
                stats.failed += 1
            else:
                stats.ok += 1
            self.lock.notify_all()
        if failed:
            logger.info("row %s failed: %s", row.id, record["error"]["message"])
        self.report_progress()

    def _record_for(self, job: _Job) -> tuple[dict[str, Any], int]:
        row = job.row
        data = row.data
        wants_input = "input" in self.include
        if row.error is not None or data is None:
            return make_record(row.id, {}, error_info(row.error)), 0
        try:
            kwargs = convert_row(
                data,
                self.specs,
                mapping=self.mapping,
                strict=self.strict,
                source=f"{self.source}:{row.line}" if self.source else f"line {row.line}",
                id_field=self.id_field,
            )
            arguments = self.program.bind_call((), kwargs)
        except Exception as exc:
            row_input = data if wants_input else None
            return make_record(row.id, {}, error_info(exc), row=row_input), 0
        state = new_state(
            self.program,
            self.backend,
            arguments,
            self.defaults,
            stream=self.stream_panel is not None,
        )
        panel = self.stream_panel
        if panel is not None:
            # Gens still stream chunk by chunk into executor.text_ (what the panel polls), but
            # nobody waits on this state from another thread, so it needs no "still running"
            # mark: with it, a program reading a variable it never produced would wait forever.
            state.executor.finished = True
            panel.track(job.position, row.id, state)
        try:
            execute(self.program, state, arguments)
            error = state.error()
            meta = dict(state.executor.meta_info)
            record = make_record(
                row.id,
                state.variables(),
                error_info(error),
                row=data if wants_input else None,
                text=state.text() if "text" in self.include else None,
                messages=state.messages() if "messages" in self.include else None,
                meta=meta if "meta" in self.include else None,
            )
            return record, count_tokens(meta)
        finally:
            if panel is not None:
                panel.untrack(job.position)
            del state  # the state (prompt, text, variables) goes as soon as it is written

    def report_progress(self) -> None:
        if self.on_progress is None or self.sink.closed:
            return
        try:
            self.on_progress(self.stats)
        except Exception:  # a display problem must not lose rows
            logger.exception("progress callback failed")

    # ------------------------------------------------------------ feeder
    def submit(self, position: int, row: Row) -> None:
        with self.lock:
            self.stats.in_flight += 1
        job = _Job(position, row)
        if self.hub is not None and not self.hub.slow_seen:
            self.hub.post(self._start_job, job)
            return
        if not self.workers:
            self._start_workers()
        self.jobs.put(job)

    def wait_for_slot(self, limit: int, stop: threading.Event) -> bool:
        """Block until fewer than ``limit`` rows are in flight; False if stopped meanwhile."""
        with self.lock:
            while self.stats.in_flight >= limit:
                if stop.is_set():
                    return False
                self.lock.wait(_POLL)
        return not stop.is_set()

    def wait_admit(self, position: int, stop: threading.Event) -> bool:
        """Block until the ordered window admits ``position``; False if stopped meanwhile."""
        while not self.emitter.wait_admit(position, timeout=_POLL):
            if stop.is_set():
                return False
        return not stop.is_set()

    def drain(self, stop: threading.Event, grace: float) -> bool:
        """Wait for the rows in flight. After a stop they get ``grace`` seconds (a second
        Ctrl-C abandons them at once). Returns True if a stop was seen."""
        deadline: float | None = None
        stopped = False
        while True:
            try:
                with self.lock:
                    if self.stats.in_flight <= 0:
                        return stopped
                    if stop.is_set() and deadline is None:
                        stopped = True
                        deadline = time.monotonic() + grace
                    if deadline is not None and time.monotonic() >= deadline:
                        return stopped
                    self.lock.wait(_POLL)
            except KeyboardInterrupt:
                if deadline is not None:  # the second interrupt: do not wait any longer
                    return True
                stop.set()

    def close(self) -> None:
        if self.hub is not None:
            self.hub.stop()
        for _ in self.workers:
            self.jobs.put(None)


def run_batch_file(
    program: SglFunction,
    rows: Iterable[Row],
    *,
    backend: Backend,
    defaults: SamplingParams,
    num_threads: int,
    on_record: Callable[[dict[str, Any]], None],
    ordered: bool = True,
    window: int | None = None,
    on_progress: Callable[[BatchStats], None] | None = None,
    include: Collection[str] = frozenset(),
    stream_panel: StreamSink | None = None,
    stop_event: threading.Event | None = None,
    mapping: dict[str, str] | None = None,
    strict: bool = False,
    id_field: str | None = None,
    skip_ids: Collection[str] = frozenset(),
    total: int | None = None,
    source: str = "",
    grace: float = 5.0,
    on_warning: Callable[[str], None] | None = None,
) -> BatchStats:
    """Run ``program`` on every row and hand one record per row to ``on_record``.

    ``on_record`` receives records in input order (``ordered``) or as rows finish; it is
    typically ``RecordWriter.write``. Rows whose id is in ``skip_ids`` (a resume) are not run.
    ``include`` adds opt-in record keys (input, text, messages, meta). ``mapping`` is
    ``{parameter: column}``. ``source`` names the input in row errors (``in.csv:7: ...``).
    Without ``strict``, ``on_warning`` hears once about each row key that fills no parameter.
    Returns the counters; ``status`` says how the run ended ("completed", "interrupted",
    "read_error": the input broke after some rows, "write_error": the output broke).
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise InvalidArgumentError(f"num_threads must be an int >= 1, not {num_threads!r}")
    unknown = sorted(set(include) - set(INCLUDE_FIELDS))
    if unknown:
        raise InvalidArgumentError(
            f"unknown include field(s) {', '.join(unknown)}; "
            f"choose from {', '.join(INCLUDE_FIELDS)}"
        )
    limit = num_threads * 2
    window = window if window is not None else max(64, limit * 4)
    stop = stop_event if stop_event is not None else threading.Event()
    stats = BatchStats(total=total)
    sink = _Sink(on_record)
    emitter = OrderedEmitter(sink, ordered=ordered, window=window)
    batch = _Batch(
        program,
        backend=backend,
        defaults=defaults,
        threads=num_threads,
        emitter=emitter,
        sink=sink,
        stats=stats,
        on_progress=on_progress,
        include=frozenset(include),
        stream_panel=stream_panel,
        mapping=mapping,
        strict=strict,
        id_field=id_field,
        source=source,
        stop=stop,
    )
    logger.info("batch %s: %d threads, window %d", program.name, num_threads, window)
    interrupted = False
    keys = _KeyCheck(program, mapping, id_field, source, on_warning if not strict else None)
    with fewer_collections():
        try:
            interrupted = _feed(batch, iter(rows), stats, stop, limit, skip_ids, keys)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
        finally:
            # Also on an unexpected error: finish (or abandon) what runs, write it, re-raise.
            wait = 0.0 if stats.write_error is not None else grace
            interrupted = batch.drain(stop, wait) or interrupted or stop.is_set()
            batch.close()
            try:
                emitter.flush_all()
            except Exception as exc:
                stats.write_error = stats.write_error or exc
            sink.close()
            with batch.lock:
                stats.abandoned = max(0, stats.running)
                stats.finished = time.monotonic()
                if stats.write_error is not None:
                    stats.status = "write_error"
                elif stats.read_error is not None:
                    stats.status = "read_error"
                else:
                    stats.status = "interrupted" if interrupted else "completed"
    if stats.abandoned:
        logger.info("abandoned %d rows still running after the interrupt", stats.abandoned)
    return stats


def _feed(
    batch: _Batch,
    rows: Any,
    stats: BatchStats,
    stop: threading.Event,
    limit: int,
    skip_ids: Collection[str],
    keys: _KeyCheck,
) -> bool:
    """Pull rows while slots are free; True if stopped before the input ended. An input that
    breaks mid-way (an unreadable file, a bad CSV header after a row) ends the feed with
    ``stats.read_error``: the rows before it still run and are written."""
    position = 0
    while True:
        if not batch.wait_for_slot(limit, stop):
            return True
        try:
            row = next(rows)
        except StopIteration:
            return False
        except (SglrunError, OSError, ValueError) as exc:
            stats.read_error = exc
            logger.info("input failed after %d rows: %s", stats.read, exc)
            return False
        stats.read += 1
        if row.data is not None:
            keys.check(row)
        if not batch.wait_admit(position, stop):
            return True
        if skip_ids and row.id in skip_ids:
            batch.emitter.skip(position)
            with batch.lock:
                stats.skipped += 1
            batch.report_progress()
        else:
            batch.submit(position, row)
        position += 1


class _KeyCheck:
    """Warns once per row key that fills no parameter (often a typo of an optional one that
    then silently keeps its default); ``--strict`` turns these into row errors instead."""

    def __init__(
        self,
        program: SglFunction,
        mapping: dict[str, str] | None,
        id_field: str | None,
        source: str,
        warn: Callable[[str], None] | None,
    ) -> None:
        names = [
            p.name for p in program.arg_params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        mapping = mapping or {}
        self.known = {mapping.get(name, name) for name in names} | {id_field}
        self.names = ", ".join(names) or "none"
        self.program = program.name
        self.source = source or "input"
        self.warn = warn
        self.seen: set[str] = set()
        self.open = any(p.kind is p.VAR_KEYWORD for p in program.arg_params)

    def check(self, row: Row) -> None:
        if self.warn is None or self.open or row.data is None:
            return
        for key in row.data:
            if key in self.known or key in self.seen or len(self.seen) > _MAX_KEY_WARNINGS:
                continue
            self.seen.add(key)
            if len(self.seen) > _MAX_KEY_WARNINGS:
                self.warn(f"{self.source}: more keys fill no parameter; not reporting them")
                return
            hint = "; --id-field id uses it as the record id" if key == "id" else ""
            self.warn(
                f"{self.source}:{row.line}: key {key!r} fills no parameter of {self.program} "
                f"({self.names}) and is ignored{hint} (--strict makes this an error)"
            )
