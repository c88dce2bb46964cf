"""One ``sglrun batch`` run: open the input and output, build the backend, run every row,
print the summary and exit with the batch's code (kept apart from the Typer wiring in app.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.cli.common import (
    EXIT_CLOSED_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROCESS,
    fail,
    one_line,
    resume_hint,
    run_defaults,
    say,
    shutdown_backend,
    silence_stdout,
)
from sglrun.errors import InputError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings
    from sglrun.cli.options import SharedFlags
    from sglrun.lang.function import SglFunction

__all__ = ["BatchJob"]


@dataclasses.dataclass
class BatchJob:
    """One ``sglrun batch``: ``prepare`` (errors exit 2, nothing has run) then ``run``."""

    fn: SglFunction
    shared: SharedFlags
    settings: Settings
    backend_name: str
    input_path: str
    out: str
    input_format: str | None
    id_field: str | None
    mapping: dict[str, str]
    strict: bool
    ordered: bool
    window: int | None
    resume: bool
    retry_errors: bool
    include: set[str]
    stream: bool
    limit: int | None
    overwrite: bool = False
    force: bool = False
    program_path: str | None = None
    row_timeout: float | None = None
    max_failures: int | None = None
    joblog: str | None = None
    delimiter: str | None = None
    input_columns: tuple[str, ...] | None = None
    rendered: tuple[str, str] | None = None  # (output, kind) rendered from the journal ``out``
    json_values: bool = False
    cache: Any = None  # the run's CallCache (``prepare`` opens it), or None
    batch_api: Any = None  # BatchApiFlags of ``--batch-api``, or None

    def prepare(self) -> None:
        """Open the input and output and build the backend; raises SglrunError (exit 2)."""
        from sglrun.batch.setup import open_batch
        from sglrun.cli.loader import auto_threads, build_backend

        self.batch = open_batch(
            self.input_path, self.out, fmt=self.input_format, id_field=self.id_field,
            limit=self.limit, resume=self.resume, retry_errors=self.retry_errors,
            overwrite=self.overwrite, force=self.force, program=self.program_path,
            function=self.fn.name, delimiter=self.delimiter,
        )  # fmt: skip
        try:
            if self.batch.repaired:
                say(f"sglrun: repaired the torn last line of {self.out} (an interrupted write)")
            if self.batch.removed:
                what = "failed or changed" if self.force else "failed"
                say(f"sglrun: removed {self.batch.removed} {what} records from {self.out} to "
                     "run them again")  # fmt: skip
            self._check_header()
            extra = self.batch_api.backend_extra(self.out) if self.batch_api else None
            self.backend = build_backend(
                self.settings, self.backend_name, insecure=self.shared.insecure, extra=extra
            )
            self.threads = auto_threads(self.settings, self.backend_name, self.backend)
            self._check_capabilities()
            from sglrun.cli.cache_cmd import open_call_cache

            self.cache = open_call_cache(
                self.settings, default_on=True, on_warning=lambda m: say(f"sglrun: warning: {m}")
            )
            if self.cache is not None:
                self.cache.identity(self.backend)  # a model file is hashed once, before rows
            elif self.batch_api:
                raise InputError(
                    "--batch-api needs the call cache: it keeps the answers between rounds "
                    "and runs (drop --no-cache or --cache-mode off)"
                )
        except BaseException:
            self.batch.finish(keep=False)
            raise
        self.log = None
        if self.joblog is not None:
            from sglrun.batch.joblog import JobLog

            try:
                self.log = JobLog(self.joblog)
            except BaseException:
                self.batch.finish(keep=False)
                raise
        timeout = self.row_timeout if self.row_timeout is not None else self.settings.row_timeout
        if self.batch_api and self.row_timeout is None:
            timeout = 0  # a row waits for its jobs, up to the providers' 24 h each round
        self.timeout = timeout if timeout else None  # 0: no time limit

    def _render(self, output: str, kind: str) -> None:
        """The CSV/TSV/Parquet/.jsonl.gz output from every record of the journal."""
        from sglrun.batch.render import render

        try:
            render(self.out, output, kind, list(self.input_columns or ()))
        except (OSError, InputError) as exc:
            fail(f"{output}: cannot write it ({one_line(exc)}); the records are in {self.out}",
                  EXIT_FAILED)  # fmt: skip

    def _check_header(self) -> None:
        """A CSV header already shows a wrong --map or, with --strict, an extra column:
        fail now (exit 2), before a model loads, not once per row."""
        check_header(self, self.batch.source, self.batch.first.data)

    def _check_capabilities(self) -> None:
        """A dry run of the first row: what the program needs that the backend cannot do
        fails now, before any row runs (exit 2), not as an error record per row."""
        from sglrun.batch.convert import convert_row, param_specs, takes_rest
        from sglrun.lang.tracing import missing_capabilities

        first = self.batch.first
        if first.data is None:
            return
        try:
            arguments = self.fn.bind_call((), convert_row(
                first.data, param_specs(self.fn.func), mapping=self.mapping or None,
                id_field=self.id_field, rest=takes_rest(self.fn.func),
            ))  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):  # a dry run's prints are noise
                missing = missing_capabilities(self.fn, arguments, self.backend)
        except Exception:  # a row or dry run that fails on its own is that row's error
            return
        if missing:
            what = ", ".join(f"{need} (for {name!r})" if name else need for need, name in missing)
            hint = self.backend.capability_hint(missing[0][0])
            raise InputError(
                f"{self.fn.name}: the {self.backend_name} backend cannot do what the program "
                f"needs: {what}" + (f"; {hint}" if hint else "")
            )

    def run(self) -> NoReturn:
        """Run every row, print the summary, and exit with the batch's code."""
        from sglrun.batch.runner import run_batch_file
        from sglrun.batch.setup import stop_on_signals
        from sglrun.batch.writers import RecordWriter
        from sglrun.cli.display import BatchDisplay

        label = "<stdout>" if self.out == "-" else self.out
        if self.rendered is not None:
            label = self.rendered[0]
        display = BatchDisplay(
            total=None,
            description=self.fn.name,
            output=label,
            quiet=self.shared.quiet,
            stream_text=self.stream,
        )
        display.count_total(self.batch.source, self.limit)
        claimed = _DataOnlyStdout() if self.out == "-" else None
        writer = RecordWriter(
            self.batch.write_path, append=self.batch.append,
            stream=claimed.data if claimed is not None else None, flush_each=False,
        )  # fmt: skip
        stop, finished = threading.Event(), threading.Event()
        wave = None
        if self.batch_api:
            from sglrun.cli.batch_api_cmd import wavefront

            wave = wavefront(self.backend)
            wave.detach = self.batch_api.detach
            wave.on_detach = stop.set
            wave.on_progress = lambda m: display.note(f"sglrun: {m}")

        def announce() -> None:
            stopped = stop.wait()
            detached = wave is not None and wave.detached
            if stopped and not finished.is_set() and not self.shared.quiet and not detached:
                display.note(
                    "sglrun: stopping: finishing the rows in flight "
                    "(press Ctrl-C again to stop at once)"
                )

        threading.Thread(target=announce, name="sglrun-interrupt", daemon=True).start()
        if self.cache is not None:  # a cache that breaks mid-run says so above the bar
            self.cache.store.on_warning = lambda m: display.note(f"sglrun: warning: {m}")
        try:
            with stop_on_signals(stop), display:
                stats = run_batch_file(
                    self.fn, self.batch.rows, backend=self.backend,
                    defaults=run_defaults(self.settings), num_threads=self.threads,
                    ordered=self.ordered, window=self.window,
                    on_record=writer.write, flush=writer.flush,
                    on_progress=display.update, include=self.include,
                    stream_panel=display.stream_panel, stop_event=stop,
                    mapping=self.mapping or None, strict=self.strict, id_field=self.id_field,
                    skip_ids=self.batch.skip, skip_digests=self.batch.digests,
                    source=self.batch.source.name,
                    on_warning=lambda message: display.note(f"sglrun: warning: {message}"),
                    row_timeout=self.timeout, max_failures=self.max_failures,
                    on_row=self.log.row if self.log is not None else None,
                    input_columns=self.input_columns, json_values=self.json_values,
                    cache=self.cache, grace=1.0 if wave is not None else 5.0,
                )  # fmt: skip
                display.update(stats)  # the final numbers, unthrottled
        except BaseException:
            self.batch.finish(keep=False)
            raise
        finally:
            finished.set()
            stop.set()  # releases the announcer
            try:
                writer.close()
            except OSError:
                pass
            if self.log is not None:
                self.log.close()
            if self.cache is not None:  # the finished calls are on disk before any exit
                from sglrun.lang.call_cache import release_store

                self.cache.finish()
                release_store(self.cache.store)
            if claimed is not None:
                claimed.restore()
        self.batch.finish(keep=stats.status != "write_error")
        if self.rendered is not None and stats.status != "write_error":
            self._render(*self.rendered)
        from sglrun.cli.cache_cmd import cache_summary

        display.summary(stats, _retries(self.backend), cache_summary(self.cache))
        if wave is not None:
            from sglrun.cli.batch_api_cmd import detached_exit, summary_line

            line = summary_line(self.backend)
            if line and not self.shared.quiet:
                say(line)
            if wave.detached:
                detached_exit(self.backend, PROCESS.standalone)
        self._exit(stats, label)

    def _exit(self, stats: Any, label: str) -> NoReturn:
        if stats.write_error is not None:
            if isinstance(stats.write_error, BrokenPipeError):  # `| head`: not worth a word
                shutdown_backend(self.backend)
                silence_stdout()
                raise typer.Exit(EXIT_CLOSED_PIPE)
            fail(f"{label}: cannot write output ({one_line(stats.write_error)})", EXIT_FAILED)
        if stats.read_error is not None:  # the rows before the broken part ran
            fail(f"{one_line(stats.read_error)}", EXIT_FAILED if stats.done else EXIT_USAGE)
        if stats.too_many_failures:
            say(
                f"sglrun: stopped taking rows at {stats.max_failures} failed rows "
                f"(--max-failures {stats.max_failures}); the rows done are kept: fix the cause, "
                "then run again with --resume --retry-errors"
            )
            shutdown_backend(self.backend)
            raise typer.Exit(EXIT_FAILED)
        if stats.status == "interrupted":
            say(resume_hint(self.out))
            if stats.abandoned and PROCESS.standalone:  # rows still running must not hold the exit
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            shutdown_backend(self.backend)
            raise typer.Exit(EXIT_INTERRUPTED)
        shutdown_backend(self.backend)
        if stats.failed:
            say(
                f"sglrun: {stats.failed} of {stats.done} rows failed; "
                'see the "error" field of their records'
            )
        kept = self.batch.kept_failures
        if kept:
            say(
                f"sglrun: {kept} rows that failed in an earlier run were kept; "
                "add --retry-errors to run them again"
            )
        raise typer.Exit(EXIT_FAILED if stats.failed or kept else EXIT_OK)


class _DataOnlyStdout:
    """While a batch writes records to stdout, file descriptor 1 points at stderr and the
    records go to a copy of the original: a program's ``print()``, or a library writing to the
    C-level stdout, can never mix with the data."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._python = sys.stdout
        self._saved: int | None = None
        if _fileno(sys.stdout) == 1 and _fileno(sys.stderr) == 2:
            self._saved = os.dup(1)
            self.data: Any = os.fdopen(os.dup(1), "wb")
            os.dup2(2, 1)
        else:  # stdout is not the process's (a test runner captures it): swap the objects
            self.data = getattr(sys.stdout, "buffer", sys.stdout)
            sys.stdout = sys.stderr

    def restore(self) -> None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        if self._saved is None:
            sys.stdout = self._python
            return
        os.dup2(self._saved, 1)
        os.close(self._saved)
        try:
            self.data.close()
        except OSError:  # a closed pipe (`| head`)
            pass


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def _retries(backend: Any) -> int:
    """Requests the HTTP transport had to retry (server backends), for the summary line."""
    stats = getattr(getattr(backend, "transport", None), "stats", None)
    stats = stats() if callable(stats) else stats
    retries = getattr(stats, "retries", 0)
    return retries if isinstance(retries, int) else 0


def check_header(job: BatchJob, source: Any, first: dict[str, Any] | None) -> None:
    """What a CSV/TSV header alone shows wrong (``--map``, ``--strict``): InputError now."""
    from sglrun.batch.convert import check_columns, param_specs, takes_rest

    if not source.has_header or first is None:
        return
    check_columns(
        first, param_specs(job.fn.func), mapping=job.mapping or None, strict=job.strict,
        id_field=job.id_field, source=f"{source.name}: header", rest=takes_rest(job.fn.func),
    )  # fmt: skip


def dry_run_batch(job: BatchJob) -> NoReturn:
    """``--dry-run``: every row's first prompt as one JSON line on stdout, without a model
    (gens are ``{name}`` placeholders); nothing is written to OUTPUT."""
    import json

    from sglrun.batch.convert import convert_row, param_specs, takes_rest
    from sglrun.batch.readers import open_rows
    from sglrun.cli.loader import backend_options
    from sglrun.lang.registry import backend_entry
    from sglrun.lang.tracing import first_prompt

    entry = backend_entry(job.backend_name)
    template = None
    if entry.chat_template is not None:
        try:
            template = entry.chat_template(backend_options(job.settings))
        except Exception:  # no model installed, say: the default template still shows
            template = None
    source = open_rows(
        job.input_path, fmt=job.input_format, id_field=job.id_field, delimiter=job.delimiter
    )
    specs = param_specs(job.fn.func)
    rest = takes_rest(job.fn.func)
    failed = 0
    with source:
        for count, row in enumerate(source):
            if job.limit is not None and count >= job.limit:
                break
            if count == 0:  # a header mistake is a usage error (exit 2), as in a real run
                check_header(job, source, row.data)
            record: dict[str, Any] = {"id": row.id, "prompt": None, "error": None}
            try:
                if row.error is not None or row.data is None:
                    raise row.error or InputError("unreadable row")
                arguments = job.fn.bind_call((), convert_row(
                    row.data, specs, mapping=job.mapping or None, strict=job.strict,
                    source=f"{source.name}:{row.line}", id_field=job.id_field, rest=rest,
                ))  # fmt: skip
                with contextlib.redirect_stdout(io.StringIO()):
                    record["prompt"] = first_prompt(job.fn, arguments, template)
            except Exception as exc:  # the row's own failure (bad value, program error)
                failed += 1
                record["error"] = {"type": type(exc).__name__, "message": one_line(exc)}
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)
