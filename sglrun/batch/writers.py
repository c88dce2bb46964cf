"""Output side of the batch runner: one JSON record per line.

Each record is written with a single ``write`` call and flushed at once, or, for the command
line, whenever no finished row is left to write (one flush per burst of rows, not per row), so
a crash or SIGKILL loses at most the records of the last burst, and ``resume.scan_output``
repairs a torn last line. Rows finish out of
order on many threads; ``OrderedEmitter`` puts them back in input order with bounded memory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any, cast

import orjson

from sglrun.errors import InputError, InvalidArgumentError

__all__ = [
    "OrderedEmitter",
    "RecordWriter",
    "check_writable",
    "encode_record",
    "make_record",
    "to_jsonable",
]

Record = dict[str, Any]

_ORJSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def encode_record(record: Record) -> bytes:
    """One JSON line; the stdlib handles what orjson refuses (integers beyond 64 bits, a lone
    surrogate from a broken input): escaped to ASCII, so the line is always valid UTF-8."""
    try:
        return orjson.dumps(record, default=str, option=_ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):
        text = json.dumps(to_jsonable(record), ensure_ascii=True, default=str)
        return text.encode("ascii") + b"\n"


class RecordWriter:
    """Appends JSON lines to a file or stdout (``-``), flushing after each record; with
    ``flush_each=False`` the caller flushes (``flush``) once it has written every record it
    has, which ``run_batch_file`` does whenever no finished row is left to write."""

    def __init__(
        self,
        path: str,
        *,
        append: bool,
        fsync: bool = False,
        stream: IO[bytes] | None = None,
        flush_each: bool = True,
    ) -> None:
        self.path = path
        self.fsync = fsync and path != "-"
        self.flush_each = flush_each
        self._dirty = False
        self._lock = threading.Lock()
        self.count = 0
        if path == "-":
            self._stream: IO[bytes] = stream or cast(
                IO[bytes], getattr(sys.stdout, "buffer", sys.stdout)
            )
            self._owned = False
        else:
            check_writable(path)
            self._stream = open(path, "ab" if append else "wb")  # closed in close()
            self._owned = True

    def write(self, record: Record) -> None:
        """Write one record, in one ``write`` (thread-safe: lines never interleave), and
        flush it unless the caller flushes."""
        line = encode_record(record)
        with self._lock:
            self._stream.write(line)
            self.count += 1
            self._dirty = True
            if self.flush_each:
                self._flush()

    __call__ = write

    def flush(self) -> None:
        """Hand what is written to the file (and to the disk with ``fsync``)."""
        with self._lock:
            if self._dirty:
                self._flush()

    def _flush(self) -> None:
        self._stream.flush()
        if self.fsync:
            os.fsync(self._stream.fileno())
        self._dirty = False

    def close(self) -> None:
        """Close the file; stdout is only flushed, since it is not ours."""
        with self._lock:
            if self._owned and not self._stream.closed:
                self._stream.close()
            elif not self._owned:
                self._stream.flush()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_writable(path: str) -> None:
    """Raise InputError (one line) now if ``path`` cannot be written, before any row runs.

    Probes by opening for append (no change to an existing file) or by creating and removing a
    temporary file in the directory, which also works where permission bits lie (root, ACLs).
    """
    if path == "-":
        return
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an output file")
    if os.path.exists(path):
        try:
            with open(path, "ab"):
                return
        except OSError as exc:
            raise InputError(f"{path}: output is not writable ({exc.strerror or exc})") from None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"{path}: output directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sglrun-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise InputError(
            f"{path}: output directory {directory} is not writable ({reason})"
        ) from None


MAX_HELD_BYTES = 64 * 1024 * 1024


class OrderedEmitter:
    """Puts out-of-order results back in input order, holding back at most ``window`` rows
    and ``max_bytes`` of records.

    The producer asks ``can_admit(index)`` (or blocks in ``wait_admit``) before starting a row,
    so a slow row 0 cannot make the emitter buffer the rest of a huge input; the bounds are on
    memory, far above the rows in flight, so a slow row delays only its own record. Rows that
    are not run (resumed, filtered) are ``skip``ped so the order does not stall on them.
    """

    def __init__(
        self,
        write: Callable[[Record], None],
        *,
        ordered: bool = True,
        window: int = 256,
        max_bytes: int = MAX_HELD_BYTES,
    ) -> None:
        if window < 1:
            raise InvalidArgumentError(f"window must be >= 1, got {window}")
        self._write = write
        self.ordered = ordered
        self.window = window
        self.max_bytes = max_bytes
        self.held_bytes = 0  # estimated size of the records held back
        self._next = 0
        self._pending: dict[int, tuple[Record, int] | None] = {}  # None marks a skipped index
        self._closed = False
        self._cond = threading.Condition()

    @property
    def next_to_write(self) -> int:
        """The lowest index not yet written or skipped."""
        return self._next

    @property
    def pending(self) -> int:
        """Records held back waiting for a lower index."""
        with self._cond:
            return sum(1 for record in self._pending.values() if record is not None)

    def can_admit(self, index: int) -> bool:
        """False while ``index`` is ``window`` or more ahead of the next row to write, or
        while the records held back fill ``max_bytes``."""
        if not self.ordered or self._closed:
            return True
        with self._cond:
            return index < self._next + self.window and self.held_bytes < self.max_bytes

    def wait_admit(self, index: int, timeout: float | None = None) -> bool:
        """Block until ``can_admit(index)``; call it from the producer, never the writer thread."""
        with self._cond:
            return self._cond.wait_for(lambda: self.can_admit(index), timeout)

    def emit(self, index: int, record: Record) -> None:
        """Hand over the record of row ``index``; it is written once all lower rows are."""
        self._put(index, record)

    def skip(self, index: int) -> None:
        """Row ``index`` produces no record; later rows need not wait for it."""
        self._put(index, None)

    def _put(self, index: int, record: Record | None) -> None:
        with self._cond:
            if not self.ordered or self._closed:
                if record is not None:
                    self._write(record)
                return
            if index < self._next or index in self._pending:
                raise InvalidArgumentError(f"row {index} was already emitted or skipped")
            if index == self._next:  # the usual case: written at once, never held
                self._next += 1
                if record is not None:
                    self._write(record)
            elif record is None:
                self._pending[index] = None
            else:
                size = len(encode_record(record))
                self._pending[index] = (record, size)
                self.held_bytes += size
            while self._next in self._pending:
                held = self._pending.pop(self._next)
                self._next += 1
                if held is not None:
                    self.held_bytes -= held[1]
                    self._write(held[0])
            self._cond.notify_all()

    def flush_all(self) -> None:
        """Write everything held, in index order, even across gaps (end of run or interrupt).

        Afterwards the emitter passes records straight through, so late finishers still land.
        """
        with self._cond:
            for index in sorted(self._pending):
                held = self._pending.pop(index)
                self._next = max(self._next, index + 1)
                if held is not None:
                    self.held_bytes -= held[1]
                    self._write(held[0])
            self._closed = True
            self._cond.notify_all()


def to_jsonable(value: Any) -> Any:
    """A JSON-safe copy: containers walked, unknown objects (numpy scalars, paths...) as str."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _error_dict(error: BaseException | Mapping[str, Any] | str | None) -> dict[str, str] | None:
    if error is None:
        return None
    if isinstance(error, BaseException):
        return {"type": type(error).__name__, "message": str(error) or type(error).__name__}
    if isinstance(error, Mapping):
        return {
            "type": str(error.get("type", "Error")),
            "message": str(error.get("message", "")),
        }
    return {"type": "Error", "message": str(error)}


def make_record(
    id: str,
    vars: Mapping[str, Any] | None,
    error: BaseException | Mapping[str, Any] | str | None,
    *,
    row: Mapping[str, Any] | None = None,
    text: str | None = None,
    messages: list[Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    digest: str | None = None,
    stdout: str | None = None,
) -> Record:
    """The stable output schema ``{"id", "vars", "error", "digest"}`` plus opt-in keys when
    given. ``digest`` identifies the input row the record belongs to (``--resume`` checks it).

    ``error`` may be an exception, a ``{"type", "message"}`` mapping or a plain message; the
    optional ``row`` is written under ``input``.
    """
    record: Record = {
        "id": str(id),
        "vars": to_jsonable(dict(vars or {})),
        "error": _error_dict(error),
    }
    if digest:
        record["digest"] = digest
    if row is not None:
        record["input"] = to_jsonable(row)
    if text is not None:
        record["text"] = text
    if messages is not None:
        record["messages"] = to_jsonable(messages)
    if meta is not None:
        record["meta"] = to_jsonable(meta)
    if stdout is not None:
        record["stdout"] = stdout
    return record
