"""Setting a batch up: everything that can fail before a row runs, and Ctrl-C handling."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sglrun.batch.readers import Row, RowSource, open_rows
from sglrun.batch.resume import prepare_resume
from sglrun.batch.writers import check_writable
from sglrun.errors import InputError

__all__ = ["BatchInput", "open_batch", "stop_on_signals"]


@dataclass
class BatchInput:
    """A batch ready to run: the lazy rows and, for a resume, what the output already holds."""

    source: RowSource
    rows: Iterator[Row]
    skip: set[str] = field(default_factory=set)
    kept_failures: int = 0  # failed records of an earlier run that the resume keeps
    repaired: bool = False  # a torn last line of the output was repaired
    removed: int = 0  # failed records taken out of the output to run again


def open_batch(
    input_path: str,
    output: str,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    resume: bool = False,
    retry_errors: bool = False,
) -> BatchInput:
    """Everything that can fail before a row runs, failing now (InputError, one line): the
    input opens and has a first row (a broken CSV header shows here), a resume's output is
    scanned and repaired, and the output is writable."""
    source = open_rows(input_path, fmt=fmt, id_field=id_field)
    rows_iter = iter(source)
    first = next(rows_iter, None)
    if first is None:
        raise InputError(f"{source.name}: no rows to run (the input is empty)")
    rows: Iterator[Row] = itertools.chain([first], rows_iter)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    batch = BatchInput(source, rows)
    if resume or retry_errors:
        state = prepare_resume(output, retry_errors=retry_errors)
        batch.skip = state.skip
        batch.kept_failures = 0 if retry_errors else len(state.failed)
        batch.repaired, batch.removed = state.repaired, state.removed
    check_writable(output)
    return batch


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) sets ``stop``: no new rows, the rows in flight may finish. A second
    Ctrl-C raises KeyboardInterrupt, which abandons them. Only in the main thread."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
