"""One ``sglrun batch`` run: open the input and output, build the backend, run every row,
print the summary and exit with the batch's code (kept apart from the Typer wiring in app.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.cli import app as cli_app
from sglrun.cli.app import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    _defaults,
    _fail,
    _one_line,
    _resume_hint,
    _say,
    _shutdown,
)

if TYPE_CHECKING:
    from sglrun.cli.app import _Shared
    from sglrun.cli.config import Settings
    from sglrun.lang.function import SglFunction

__all__ = ["BatchJob"]


@dataclasses.dataclass
class BatchJob:
    """One ``sglrun batch``: ``prepare`` (errors exit 2, nothing has run) then ``run``."""

    fn: SglFunction
    shared: _Shared
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

    def prepare(self) -> None:
        """Open the input and output and build the backend; raises SglrunError (exit 2)."""
        from sglrun.batch.setup import open_batch
        from sglrun.cli.loader import auto_threads, build_backend

        self.batch = open_batch(
            self.input_path, self.out, fmt=self.input_format, id_field=self.id_field,
            limit=self.limit, resume=self.resume, retry_errors=self.retry_errors,
            overwrite=self.overwrite, force=self.force, program=self.program_path,
            function=self.fn.name,
        )  # fmt: skip
        try:
            if self.batch.repaired:
                _say(f"sglrun: repaired the torn last line of {self.out} (an interrupted write)")
            if self.batch.removed:
                what = "failed or changed" if self.force else "failed"
                _say(f"sglrun: removed {self.batch.removed} {what} records from {self.out} to "
                     "run them again")  # fmt: skip
            self.backend = build_backend(
                self.settings, self.backend_name, insecure=self.shared.insecure
            )
            self.threads = auto_threads(self.settings, self.backend_name, self.backend)
        except BaseException:
            self.batch.finish(keep=False)
            raise
        timeout = self.row_timeout if self.row_timeout is not None else self.settings.row_timeout
        self.timeout = timeout if timeout else None  # 0: no time limit

    def run(self) -> NoReturn:
        """Run every row, print the summary, and exit with the batch's code."""
        from sglrun.batch.runner import run_batch_file
        from sglrun.batch.setup import stop_on_signals
        from sglrun.batch.writers import RecordWriter
        from sglrun.cli.display import BatchDisplay

        label = "<stdout>" if self.out == "-" else self.out
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
            stream=claimed.data if claimed is not None else None,
        )  # fmt: skip
        stop, finished = threading.Event(), threading.Event()

        def announce() -> None:
            if stop.wait() and not finished.is_set() and not self.shared.quiet:
                display.note(
                    "sglrun: stopping: finishing the rows in flight "
                    "(press Ctrl-C again to stop at once)"
                )

        threading.Thread(target=announce, name="sglrun-interrupt", daemon=True).start()
        try:
            with stop_on_signals(stop), display:
                stats = run_batch_file(
                    self.fn, self.batch.rows, backend=self.backend,
                    defaults=_defaults(self.settings), num_threads=self.threads,
                    ordered=self.ordered, window=self.window,
                    on_record=writer.write, on_progress=display.update, include=self.include,
                    stream_panel=display.stream_panel, stop_event=stop,
                    mapping=self.mapping or None, strict=self.strict, id_field=self.id_field,
                    skip_ids=self.batch.skip, skip_digests=self.batch.digests,
                    source=self.batch.source.name,
                    on_warning=lambda message: display.note(f"sglrun: warning: {message}"),
                    row_timeout=self.timeout,
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
            if claimed is not None:
                claimed.restore()
        self.batch.finish(keep=stats.status != "write_error")
        display.summary(stats, _retries(self.backend))
        self._exit(stats, label)

    def _exit(self, stats: Any, label: str) -> NoReturn:
        if stats.write_error is not None:
            if isinstance(stats.write_error, BrokenPipeError):  # `| head`: not worth a word
                _silence_stdout()
                raise typer.Exit(EXIT_FAILED)
            _fail(f"{label}: cannot write output ({_one_line(stats.write_error)})", EXIT_FAILED)
        if stats.read_error is not None:  # the rows before the broken part ran
            _fail(f"{_one_line(stats.read_error)}", EXIT_FAILED if stats.done else EXIT_USAGE)
        if stats.status == "interrupted":
            _say(_resume_hint(self.out))
            if stats.abandoned and cli_app._STANDALONE:  # rows still running must not hold the exit
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            _shutdown(self.backend)
            raise typer.Exit(EXIT_INTERRUPTED)
        _shutdown(self.backend)
        if stats.failed:
            _say(
                f"sglrun: {stats.failed} of {stats.done} rows failed; "
                'see the "error" field of their records'
            )
        kept = self.batch.kept_failures
        if kept:
            _say(
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


def _silence_stdout() -> None:
    """After a closed pipe (``| head``), keep Python's exit flush from complaining."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
