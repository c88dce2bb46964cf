"""Setting a batch up: everything that can fail before a row runs, and Ctrl-C handling.

Nothing here may destroy a user's data: the output is checked to be another file than the
input and the program (links resolved) before anything is opened for writing; one process at a
time writes an output (its manifest's lock); an existing output is replaced only with
``--overwrite`` (and then only once the new one is complete or interrupted: it is written
beside it first), continued only with ``--resume`` after its manifest and every record's row
digest match the input and the program.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sglrun
from sglrun.batch.manifest import (
    OutputLock,
    manifest_path,
    now,
    program_fingerprint,
    read_manifest,
    write_manifest,
)
from sglrun.batch.readers import Row, RowSource, open_rows
from sglrun.batch.resume import prepare_resume, scan_output, verify_resume
from sglrun.batch.writers import check_writable
from sglrun.errors import InputError

__all__ = ["BatchInput", "check_paths", "open_batch", "stop_on_signals"]


@dataclass
class BatchInput:
    """A batch ready to run: the lazy rows, where records go, and what a resume keeps."""

    source: RowSource
    rows: Iterator[Row]
    first: Row
    output: str
    write_path: str  # the output, or a new file beside it when replacing one (--overwrite)
    append: bool = False
    skip: set[str] = field(default_factory=set)
    digests: dict[str, str | None] = field(default_factory=dict)  # of the skipped rows
    kept_failures: int = 0  # failed records of an earlier run that the resume keeps
    repaired: bool = False  # a torn last line of the output was repaired
    removed: int = 0  # records taken out of the output to run again (or gone from the input)
    lock: OutputLock | None = None
    info: dict[str, Any] = field(default_factory=dict)  # the manifest of this run

    def finish(self, *, keep: bool) -> None:
        """After the run: a replacing output takes the old one's place if ``keep`` (the run
        completed or was interrupted), else it is dropped and the old one stays."""
        lock = self.lock
        if lock is None:
            return
        try:
            if self.write_path != self.output:
                if keep:
                    os.replace(self.write_path, self.output)
                    write_manifest(self.output, self.info)
                elif os.path.exists(self.write_path):
                    os.unlink(self.write_path)
            elif not _nonempty(self.output) and os.path.exists(manifest_path(self.output)):
                os.unlink(manifest_path(self.output))  # nothing was written: nothing to resume
        finally:
            lock.release()
            self.lock = None


def _same(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def check_paths(input_path: str, output: str, program: str | None = None) -> None:
    """Refuse (one line) an output that is the input or the program, however it is reached
    (a symlink, a hard link, a linked directory), before anything is opened for writing."""
    if output == "-":
        return
    for path, what in ((input_path, "input"), (program, "program")):
        if path is None or path == "-":
            continue
        for candidate in (output, manifest_path(output)):
            if os.path.lexists(candidate) and _same(candidate, path):
                how = "" if os.path.abspath(candidate) == os.path.abspath(path) else (
                    f" (it is {path} through a link)"
                )  # fmt: skip
                raise InputError(
                    f"{output}: writing it would overwrite the {what}{how}; choose another -o"
                )


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def open_batch(
    input_path: str,
    output: str,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    resume: bool = False,
    retry_errors: bool = False,
    overwrite: bool = False,
    force: bool = False,
    program: str | None = None,
    function: str = "",
    delimiter: str | None = None,
) -> BatchInput:
    """Everything that can fail before a row runs, failing now (InputError, one line): the
    paths are distinct, the input opens and has a first row (a broken CSV header shows here),
    the output is free (not written by another process, not replaced or continued unasked),
    a resume's output matches the input and the program, and the output is writable."""
    check_paths(input_path, output, program)
    source = open_rows(input_path, fmt=fmt, id_field=id_field, delimiter=delimiter)
    rows_iter = iter(source)
    first = next(rows_iter, None)
    if first is None:
        raise InputError(f"{source.name}: no rows to run (the input is empty)")
    rows: Iterator[Row] = itertools.chain([first], rows_iter)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    batch = BatchInput(source, rows, first, output, output)
    if output == "-":
        if resume or retry_errors:
            raise InputError("cannot resume into stdout; give an output file with -o")
        return batch
    check_writable(output)  # a missing directory or a read-only file says so plainly
    lock = OutputLock(output)  # from here on this process alone writes the output
    try:
        _prepare_output(
            batch, lock, source, id_field=id_field, resume=resume or retry_errors,
            retry_errors=retry_errors, overwrite=overwrite, force=force, program=program,
            function=function,
        )  # fmt: skip
    except BaseException:
        lock.release()
        raise
    return batch


def _prepare_output(
    batch: BatchInput,
    lock: OutputLock,
    source: RowSource,
    *,
    id_field: str | None,
    resume: bool,
    retry_errors: bool,
    overwrite: bool,
    force: bool,
    program: str | None,
    function: str,
) -> None:
    output = batch.output
    fingerprint = program_fingerprint(program, function) if program else ""
    previous = read_manifest(output)
    if resume:
        if force and source.path is None:
            raise InputError(
                "--force needs the input as a file (stdin cannot be read twice to find the "
                "rows that changed)"
            )
        state = scan_output(output)
        # The whole input is read once more (even with --limit: rows past the limit are
        # still rows of the input) and every record checked against its row.
        recheck = None
        if source.path is not None and state.records:
            recheck = open_rows(
                source.path, fmt=source.format, id_field=id_field, delimiter=source.delimiter
            )
        drop = verify_resume(
            state, previous, id_field=id_field, program=fingerprint, rows=recheck, force=force
        )
        state = prepare_resume(output, retry_errors=retry_errors, drop=drop, state=state)
        batch.skip = state.skip
        batch.digests = state.digests
        batch.kept_failures = 0 if retry_errors else len(state.failed - drop)
        batch.repaired, batch.removed = state.repaired, state.removed
        batch.append = True
    elif _nonempty(output):
        if not overwrite:
            count = scan_count(output)
            raise InputError(
                f"{output}: already holds {count}; add --resume to continue it or --overwrite "
                "to replace it"
            )
        directory, name = os.path.split(os.path.abspath(output))
        batch.write_path = os.path.join(directory, f".{name}.sglrun-new")
    check_writable(batch.write_path)
    batch.info = {
        "sglrun": sglrun.__version__,
        "output": os.path.abspath(output),
        "inputs": [_describe_input(source)],
        "program": {
            "path": os.path.abspath(program) if program else None,
            "function": function,
            "fingerprint": fingerprint,
        },  # fmt: skip
        "id_field": id_field,
        "created": (previous or {}).get("created", now()) if resume else now(),
        "updated": now(),
    }
    batch.lock = lock
    if batch.write_path == output:  # a new or continued output: resumable from the start
        write_manifest(output, batch.info)


def scan_count(path: str) -> str:
    """``N records`` (or what the file holds, if it is not an sglrun output)."""
    try:
        state = scan_output(path)
    except InputError:
        return "data that is not sglrun output"
    return f"{state.records} records"


def _describe_input(source: RowSource) -> dict[str, Any]:
    if source.path is None:
        return {"path": "-"}
    try:
        stat = os.stat(source.path)
    except OSError:
        return {"path": os.path.abspath(source.path)}
    return {"path": os.path.abspath(source.path), "size": stat.st_size, "mtime": stat.st_mtime}


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal) set ``stop``: no new rows, the rows in
    flight may finish. A second one raises KeyboardInterrupt, which abandons them. Only in
    the main thread."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    wanted = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        wanted.append(signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in wanted}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
