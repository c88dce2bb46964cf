"""The batch runner: one program over a lazy stream of rows, one JSON record per row.

Rows run on the shared scheduler (``sglrun.lang.scheduler``): at most ``num_threads`` programs
in flight, a finished row frees its slot at once. Memory does not grow with the input: rows are
read on a thread of their own only a little ahead of the programs, each finished row is
written (and flushed) at once and its program state dropped, and the ordered emitter holds
at most ``window`` rows back. A row that fails, at conversion or in the program, or that runs
past ``row_timeout``, becomes an error record and never stops the batch. Interrupting (Ctrl-C
or ``stop_event``) stops taking rows, gives the rows in flight a short grace to finish, writes
what finished and reports ``interrupted``; the output then holds only whole records, so
``--resume`` can carry on from it.

No Rich here: progress and the streaming panel are callbacks the CLI supplies.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sglrun.batch.convert import convert_row, param_specs, takes_rest
from sglrun.batch.readers import Row
from sglrun.batch.writers import OrderedEmitter, make_record
from sglrun.errors import InputError, InvalidArgumentError, SglrunError, VariableNotProducedError
from sglrun.lang.hub import current_task
from sglrun.lang.runtime import execute, new_state
from sglrun.lang.scheduler import Feed, Finished, Scheduler

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.call_cache import CallCache
    from sglrun.lang.function import SglFunction
    from sglrun.lang.ir import SamplingParams
    from sglrun.lang.state import ProgramState

__all__ = [
    "DEFAULT_WINDOW",
    "INCLUDE_FIELDS",
    "BatchStats",
    "StreamSink",
    "count_tokens",
    "error_info",
    "run_batch_file",
    "token_counts",
]

logger = logging.getLogger(__name__)

INCLUDE_FIELDS = ("input", "text", "messages", "meta", "stdout")
DEFAULT_WINDOW = 100_000  # rows a slow row may fall behind before it holds up new rows
_MESSAGE_LIMIT = 2000
_POLL = 0.1  # seconds between checks of the stop event while the reader waits
_MAX_KEY_WARNINGS = 20


class StreamSink(Protocol):
    """Shows the text of rows in flight (the CLI's live panel); called from the hub thread."""

    def track(self, key: int, label: str, state: ProgramState) -> None: ...

    def untrack(self, key: int) -> None: ...


@dataclass(frozen=True)
class _Cost:
    """What one row cost: tokens generated and sent, and its own run time."""

    completion_tokens: int
    prompt_tokens: int
    seconds: float
    started: float = 0.0  # Unix time


@dataclass
class BatchStats:
    """Counters of one batch run; updated under the runner's lock."""

    total: int | None = None
    read: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # sent (as the backends count them, cached prefixes included)
    row_seconds: float = 0.0  # the rows' own run times, summed (mean latency = / done)
    abandoned: int = 0
    max_failures: int | None = None  # stop taking rows once this many failed
    too_many_failures: bool = False
    timed_out: int = 0
    left_behind: int = 0  # threads of timed-out rows that could not be stopped
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
    def mean_latency(self) -> float:
        return self.row_seconds / self.done if self.done else 0.0

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


def count_tokens(meta_info: Mapping[str, Any], key: str = "completion_tokens") -> int:
    """Generated tokens: the ``completion_tokens`` of every variable (forks give lists);
    ``key="prompt_tokens"`` counts the tokens sent."""
    return token_counts(meta_info, (key,))[0]


def token_counts(
    meta_info: Mapping[str, Any], keys: tuple[str, ...] = ("completion_tokens", "prompt_tokens")
) -> list[int]:
    """``count_tokens`` for several keys in one pass over the variables (once per row)."""
    totals = [0] * len(keys)
    for value in meta_info.values():
        for item in value if isinstance(value, list) else (value,):
            if not isinstance(item, Mapping):
                continue
            for at, key in enumerate(keys):
                count = item.get(key)
                if type(count) is int:
                    totals[at] += count
                elif isinstance(count, list):
                    totals[at] += sum(c for c in count if type(c) is int)
    return totals


@dataclass
class _Job:
    position: int
    row: Row


class _Batch:
    """One run: the reader (a feed thread), the rows (scheduler tasks), the records."""

    def __init__(
        self,
        program: SglFunction,
        *,
        backend: Backend,
        defaults: SamplingParams,
        emitter: OrderedEmitter,
        stats: BatchStats,
        on_progress: Callable[[BatchStats], None] | None,
        include: frozenset[str],
        stream_panel: StreamSink | None,
        mapping: dict[str, str] | None,
        strict: bool,
        id_field: str | None,
        source: str,
        stop: threading.Event,
        skip_ids: Collection[str],
        skip_digests: Mapping[str, str | None],
        keys: _KeyCheck,
        on_row: Callable[[str, float, float, str], None] | None = None,
        input_columns: tuple[str, ...] | None = None,
        json_values: bool = False,
        cache: CallCache | None = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self.flush = flush
        self.json_values = json_values
        self.cache = cache
        self.on_row = on_row
        self.input_columns = input_columns
        self.program = program
        self.backend = backend
        self.defaults = defaults
        self.emitter = emitter
        self.stats = stats
        self.on_progress = on_progress
        self.include = include
        self.stream_panel = stream_panel
        self.mapping = mapping
        self.strict = strict
        self.id_field = id_field
        self.source = source
        self.stop = stop
        self.skip_ids = skip_ids
        self.skip_digests = skip_digests
        self.keys = keys
        self.specs = param_specs(program.func)
        self.rest = takes_rest(program.func)
        self.lock = threading.Lock()
        self.output_closed = False
        self.halt = threading.Event()  # the run is over (or the output broke): stop reading

    # ------------------------------------------------------------ reading (feed thread)
    def jobs(self, rows: Iterator[Row]) -> Iterator[_Job]:
        """The rows to run, read ahead of the programs by the feed thread. Rows already done
        (a resume) are skipped here; the ordered window holds reading back. An input that
        breaks mid-way ends the rows with ``stats.read_error``: the rows before it still
        run and are written."""
        position = 0
        stats = self.stats
        while not self.stopping():
            try:
                row = next(rows)
            except StopIteration:
                return
            except (SglrunError, OSError, ValueError) as exc:
                stats.read_error = exc
                logger.info("input failed after %d rows: %s", stats.read, exc)
                return
            with self.lock:
                stats.read += 1
            if row.data is not None:
                self.keys.check(row)
            while not self.emitter.wait_admit(position, timeout=_POLL):
                if self.stopping():
                    return
            if self.skip_ids and row.id in self.skip_ids:
                expected = self.skip_digests.get(row.id)
                if expected is not None and row.digest and expected != row.digest:
                    stats.read_error = InputError(
                        f"{self.source or 'input'}:{row.line}: row {row.id!r} is not the row its "
                        "record was written for (the input changed since); nothing from here "
                        "on was run"
                    )
                    return
                self.emitter.skip(position)
                with self.lock:
                    stats.skipped += 1
                self.report_progress()
            else:
                yield _Job(position, row)
            position += 1

    def _input_part(self, data: dict[str, Any]) -> dict[str, Any]:
        """The input row for ``--include input`` (only ``input:COLS`` when named)."""
        if self.input_columns is None:
            return data
        return {column: data.get(column) for column in self.input_columns}

    def stopping(self) -> bool:
        return self.stop.is_set() or self.halt.is_set()

    # ------------------------------------------------------------ one row (a hub task)
    def run_job(self, job: _Job) -> tuple[dict[str, Any], _Cost]:
        if "stdout" in self.include:  # this row's print() lands in its record
            task = current_task()
            if task is not None:
                task.context = {"stdout": []}
        started, wall = time.monotonic(), time.time()
        try:
            record, tokens, sent = self._record_for(job)
        except Exception as exc:  # a row must survive anything a program does
            record = make_record(job.row.id, {}, error_info(exc), digest=job.row.digest)
            tokens = sent = 0
        return record, _Cost(tokens, sent, time.monotonic() - started, wall)

    def _record_for(self, job: _Job) -> tuple[dict[str, Any], int, int]:
        row = job.row
        data = row.data
        wants_input = "input" in self.include
        if row.error is not None or data is None:
            return make_record(row.id, {}, error_info(row.error), digest=row.digest), 0, 0
        try:
            kwargs = convert_row(
                data,
                self.specs,
                mapping=self.mapping,
                strict=self.strict,
                source=f"{self.source}:{row.line}" if self.source else f"line {row.line}",
                id_field=self.id_field,
                rest=self.rest,
            )
            arguments = self.program.bind_call((), kwargs)
        except Exception as exc:
            row_input = self._input_part(data) if wants_input else None
            record = make_record(row.id, {}, error_info(exc), row=row_input, digest=row.digest)
            return record, 0, 0
        panel = self.stream_panel
        # With the live panel, gens stream chunk by chunk into the state's text (what the
        # panel polls); nobody reads the state from another thread, so nobody waits on it.
        state = new_state(
            self.program, self.backend, arguments, self.defaults,
            stream=panel is not None, readers_wait=False, cache=self.cache,
        )  # fmt: skip
        if panel is not None:
            panel.track(job.position, row.id, state)
        try:
            execute(self.program, state, arguments)
            error = state.error()
            meta = state.meta_infos()
            variables = state.variables()
            if self.json_values:
                variables = _json_values(variables, meta)
            record = make_record(
                row.id,
                variables,
                error_info(error),
                row=self._input_part(data) if wants_input else None,
                text=state.text() if "text" in self.include else None,
                messages=state.messages() if "messages" in self.include else None,
                meta=meta if "meta" in self.include else None,
                digest=row.digest,
                stdout=_captured() if "stdout" in self.include else None,
            )
            generated, sent = token_counts(meta)
            return record, generated, sent
        finally:
            if panel is not None:
                panel.untrack(job.position)
            del state  # the state (prompt, text, variables) goes as soon as it is written

    # ------------------------------------------------------------ records (hub thread)
    def finish(self, finished: Finished) -> None:
        job: _Job = finished.item
        cost = _Cost(0, 0, 0.0)
        if finished.error is not None:  # cancelled outside the program (a time limit)
            record = make_record(job.row.id, {}, error_info(finished.error), digest=job.row.digest)
        else:
            record, cost = finished.result
        failed = record.get("error") is not None
        if not self.output_closed:
            try:
                self.emitter.emit(job.position, record)
            except Exception as exc:  # a broken output (disk full, closed pipe) stops the batch
                self.stats.write_error = self.stats.write_error or exc
                self.output_closed = True
                self.halt.set()
        with self.lock:
            stats = self.stats
            stats.done += 1
            stats.tokens += cost.completion_tokens
            stats.prompt_tokens += cost.prompt_tokens
            stats.row_seconds += cost.seconds
            if failed:
                stats.failed += 1
                stats.timed_out += record["error"]["type"] == "RowTimeout"
                if stats.max_failures is not None and stats.failed >= stats.max_failures:
                    stats.too_many_failures = True
                    self.halt.set()  # no new rows; those in flight finish and are written
            else:
                stats.ok += 1
        if failed:
            logger.info("row %s failed: %s", job.row.id, record["error"]["message"])
        if self.on_row is not None:
            status = "ok" if not failed else "failed"
            if failed and record["error"]["type"] == "RowTimeout":
                status = "timeout"
            try:
                self.on_row(job.row.id, cost.started or time.time(), cost.seconds, status)
            except Exception:  # the job log is a side channel: it must not lose a row
                logger.exception("job log write failed")
        self.report_progress()

    def flush_records(self) -> None:
        """The records handed over so far reach the output; a broken output stops the batch
        as a failed write does."""
        if self.flush is None or self.output_closed:
            return
        try:
            self.flush()
        except Exception as exc:
            self.stats.write_error = self.stats.write_error or exc
            self.output_closed = True
            self.halt.set()

    def report_progress(self) -> None:
        if self.on_progress is None or self.output_closed:
            return
        try:
            self.on_progress(self.stats)
        except Exception:  # a display problem must not lose rows
            logger.exception("progress callback failed")


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
    skip_digests: Mapping[str, str | None] | None = None,
    total: int | None = None,
    source: str = "",
    grace: float = 5.0,
    on_warning: Callable[[str], None] | None = None,
    row_timeout: float | None = None,
    max_failures: int | None = None,
    on_row: Callable[[str, float, float, str], None] | None = None,
    input_columns: tuple[str, ...] | None = None,
    json_values: bool = False,
    cache: CallCache | None = None,
    flush: Callable[[], None] | None = None,
) -> BatchStats:
    """Run ``program`` on every row and hand one record per row to ``on_record``.

    ``num_threads`` programs are in flight at once. ``on_record`` receives records in input
    order (``ordered``) or as rows finish; it is typically ``RecordWriter.write``. Rows whose
    id is in ``skip_ids`` (a resume) are not run. ``include`` adds opt-in record keys (input,
    text, messages, meta). ``mapping`` is ``{parameter: column}``. ``source`` names the input
    in row errors (``in.csv:7: ...``). Without ``strict``, ``on_warning`` hears once about
    each row key that fills no parameter. A row running longer than ``row_timeout`` seconds
    becomes a ``RowTimeout`` error record. After ``max_failures`` failed rows no new row
    starts (``stats.too_many_failures``). ``on_row(id, start, seconds, status)`` hears of
    each finished row (``--joblog``); ``input_columns`` narrows ``include`` input to those
    columns; ``json_values`` writes a json_schema gen's value as the JSON it holds; ``cache``
    replays the model calls it holds and stores the new ones; ``flush()`` is called whenever
    every record finished so far has been handed over (and at the end). Returns
    the counters; ``status`` says how the run ended ("completed", "interrupted",
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
    if row_timeout is not None and row_timeout <= 0:
        raise InvalidArgumentError(f"row_timeout must be > 0 seconds, not {row_timeout!r}")
    window = window if window is not None else DEFAULT_WINDOW
    stop = stop_event if stop_event is not None else threading.Event()
    if max_failures is not None and (isinstance(max_failures, bool) or max_failures < 1):
        raise InvalidArgumentError(f"max_failures must be an int >= 1, not {max_failures!r}")
    stats = BatchStats(total=total, max_failures=max_failures)
    emitter = OrderedEmitter(on_record, ordered=ordered, window=window)
    keys = _KeyCheck(program, mapping, id_field, source, on_warning if not strict else None)
    batch = _Batch(
        program, backend=backend, defaults=defaults, emitter=emitter, stats=stats,
        on_progress=on_progress, include=frozenset(include), stream_panel=stream_panel,
        mapping=mapping, strict=strict, id_field=id_field, source=source, stop=stop,
        skip_ids=skip_ids, skip_digests=skip_digests or {}, keys=keys, on_row=on_row,
        input_columns=input_columns, json_values=json_values, cache=cache, flush=flush,
    )  # fmt: skip
    scheduler = Scheduler(num_threads, name=f"batch {program.name}", row_timeout=row_timeout)
    logger.info("batch %s: %d in flight, window %d", program.name, num_threads, window)
    feed = Feed(batch.jobs(iter(rows)), capacity=max(1, num_threads - 1))
    interrupted = False
    on_idle = batch.flush_records if flush is not None else None
    finished_rows = scheduler.imap(batch.run_job, feed, stop=stop, grace=grace, on_idle=on_idle)
    capture = _RowStdout.install() if "stdout" in include else None
    try:
        for finished in finished_rows:
            batch.finish(finished)
            if stats.write_error is not None:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: abandon the rows in flight at once
        interrupted = True
    finally:
        finished_rows.close()
        if capture is not None:
            capture.uninstall()
        batch.halt.set()  # the feed thread stops reading
        if isinstance(feed.error, KeyboardInterrupt):
            interrupted = True
        elif feed.error is not None:  # the reader itself broke: the input could not be read
            stats.read_error = stats.read_error or feed.error
        interrupted = interrupted or stop.is_set()
        try:
            emitter.flush_all()
        except Exception as exc:
            stats.write_error = stats.write_error or exc
        if on_idle is not None:
            on_idle()
        batch.output_closed = True
        stats.abandoned = scheduler.abandoned
        stats.left_behind = scheduler.left_behind
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


def _json_values(variables: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of json_schema gens as the objects their text holds (text kept if it is not
    valid JSON, e.g. cut short by max_tokens)."""
    shown = dict(variables)
    for name, value in variables.items():
        info = meta.get(name)
        if isinstance(info, Mapping) and info.get("constraint") == "json_schema":
            if isinstance(value, str):
                try:
                    shown[name] = json.loads(value)
                except ValueError:
                    pass
    return shown


def _captured() -> str:
    """What the running row printed (``--include stdout``)."""
    task = current_task()
    context = task.context if task is not None else None
    return "".join(context.get("stdout", ())) if context else ""


class _RowStdout:
    """``sys.stdout`` while rows run with ``--include stdout``: a row's prints are kept for
    its record; anything else goes where stdout went before."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    @classmethod
    def install(cls) -> _RowStdout:
        capture = cls(sys.stdout)
        sys.stdout = capture  # type: ignore[assignment]
        return capture

    def uninstall(self) -> None:
        if sys.stdout is self:
            sys.stdout = self.fallback

    def write(self, text: str) -> int:
        task = current_task()
        context = task.context if task is not None else None
        if context is not None and "stdout" in context:
            context["stdout"].append(text)
            return len(text)
        return int(self.fallback.write(text))

    def flush(self) -> None:
        self.fallback.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fallback, name)


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
        self.known: set[str | None] = {mapping.get(name, name) for name in names}
        self.known.add(id_field)
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
