"""Input rows for the batch runner: lazy JSONL/CSV/stdin reading and argument conversion.

Rows are streamed line by line so a multi-gigabyte input never sits in memory, and a malformed
line becomes one ``Row`` with an ``InputError`` instead of aborting the whole batch: one bad row
out of a million should cost one error record, not the run.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from sglrun.errors import InputError, InvalidArgumentError

__all__ = ["Row", "RowSource", "open_rows", "parse_json", "row_digest"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "csv": "csv", "tsv": "tsv"}
#: The field separator of each delimited format (``delimiter=`` overrides it).
DELIMITERS = {"csv": ",", "tsv": "\t"}
_BOM = b"\xef\xbb\xbf"
# csv refuses fields over 128 KiB by default; a 10 MB prompt is a legitimate row.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Row:
    """One data row; ``error`` is set (and ``data`` is None) when the line was malformed.
    ``digest`` identifies its content (a resume checks a record against its row with it)."""

    index: int
    line: int
    id: str
    data: dict[str, Any] | None
    error: InputError | None = None
    digest: str = ""


def row_digest(data: Any) -> str:
    """A short, stable hash of a row's content (its keys in any order, values exact)."""
    try:
        canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):  # integers beyond 64 bits, odd values
        canonical = json.dumps(data, sort_keys=True, default=str).encode("utf-8", "replace")
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def _fail(name: str, line: int, message: str) -> InputError:
    return InputError(f"{name}:{line}: {message}")


def _binary_lines(stream: IO[Any]) -> Iterator[bytes]:
    """Lines as bytes, whether the stream is binary or text (a test may pass either)."""
    for line in stream:
        yield line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line


def _decode(raw: bytes) -> tuple[str | None, str]:
    """UTF-8 text of a line, or None and a short reason (binary data, a latin-1 file...)."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        return None, f"not valid UTF-8 (byte 0x{bad} at column {exc.start + 1})"


# A run of 19+ digits may be an integer beyond 64 bits, which orjson reads as a float
# (123456789012345678901234567890 -> 1.2345678901234568e+29): the stdlib keeps it exact.
_LONG_NUMBER = re.compile(r"\d{19,}")


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` that keeps every integer exact (orjson when it can, for speed)."""
    if _LONG_NUMBER.search(text if isinstance(text, str) else text.decode("utf-8", "replace")):
        return json.loads(text)
    return orjson.loads(text)


def _parse_json_line(text: str) -> tuple[Any, str]:
    """Parsed value or an error text; orjson for speed, the stdlib for its precise messages
    and for integers beyond 64 bits."""
    if not _LONG_NUMBER.search(text):
        try:
            return orjson.loads(text), ""
        except orjson.JSONDecodeError:
            pass
    try:  # also accepts what orjson refuses but JSON tools emit: NaN, ints over 64 bits
        return json.loads(text), ""
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({exc})"


def _jsonl_records(
    lines: Iterable[bytes], name: str, start_line: int = 1
) -> Iterator[tuple[int, Any, str]]:
    """(line number, object or None, error) for every non-blank line; ``start_line`` numbers
    the first line (a block of a bigger file)."""
    for number, raw in enumerate(lines, start=start_line):
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw.strip():
            continue
        text, why = _decode(raw.rstrip(b"\r\n"))
        if text is None:
            yield number, None, why
            continue
        value, why = _parse_json_line(text)
        if why:
            yield number, None, why
        elif not isinstance(value, dict):
            yield number, None, f"expected a JSON object, got {_json_kind(value)}"
        else:
            yield number, value, ""


_KINDS = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _json_kind(value: Any) -> str:
    return _KINDS.get(type(value), "a number")


class _LineCounter:
    """Feeds decoded lines to ``csv.reader`` and remembers where each record started."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._lines = iter(lines)
        self.consumed = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self._lines:
            self.consumed += 1
            if self.consumed == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            # surrogateescape keeps the record boundaries intact; bad bytes are reported later.
            yield raw.decode("utf-8", "surrogateescape")


def _has_bad_bytes(fields: list[str]) -> str:
    for field in fields:
        try:
            field.encode("utf-8")  # fails only on the surrogates that stand for undecodable bytes
        except UnicodeEncodeError as exc:
            return f"not valid UTF-8 (byte 0x{ord(field[exc.start]) - 0xDC00:02x} in a field)"
    return ""


def _csv_records(
    lines: Iterable[bytes], name: str, delimiter: str = ","
) -> Iterator[tuple[int, Any, str]]:
    """(line number, dict or None, error) per CSV record; the first record is the header."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    feed = _LineCounter(lines)
    # strict: an unterminated quote is an error
    reader = csv.reader(feed, strict=True, delimiter=delimiter)
    header: list[str] | None = None
    while True:
        start = feed.consumed + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if header is None:  # without a header no later row can be read right
                raise _fail(name, start, f"CSV header is not valid CSV ({exc})") from None
            if "unexpected end of data" in str(exc):
                swallowed = feed.consumed - start + 1
                yield (
                    start,
                    None,
                    (
                        f"not valid CSV: a quoted field opened here is never closed, so the rest "
                        f"of the file ({swallowed} lines) was read into it"
                    ),
                )
                return
            yield start, None, f"not valid CSV ({exc})"
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        bad = _has_bad_bytes(fields)
        if header is None:
            if bad:
                raise _fail(name, start, f"CSV header is {bad}")
            header = [field.strip() for field in fields]
            _check_header(header, name, start)
            continue
        if bad:
            yield start, None, bad
        elif len(fields) != len(header):
            yield start, None, f"expected {len(header)} fields as in the header, got {len(fields)}"
        else:
            yield start, dict(zip(header, fields, strict=True)), ""


def _check_header(header: list[str], name: str, line: int) -> None:
    if any(not column for column in header):
        raise _fail(name, line, "CSV header has an empty column name")
    counts = Counter(header)  # linear: a header of 100,000 columns is checked at once
    repeated = sorted(column for column, count in counts.items() if count > 1)
    if repeated:
        raise _fail(name, line, f"CSV header repeats the column {repeated[0]!r}")


class RowSource:
    """An iterable of ``Row``; the file is opened up front so a bad path fails before any work."""

    def __init__(
        self,
        name: str,
        fmt: str,
        id_field: str | None,
        lines: Iterable[bytes],
        path: str | None,
        handle: IO[Any] | None,
        delimiter: str | None = None,
        *,
        start_line: int = 1,
        id_scope: str | None = None,
        records: Iterable[tuple[int, Any, str]] | None = None,
    ) -> None:
        self.name = name
        self.start_line = start_line
        self.id_scope = id_scope  # ids without --id-field: "<scope>#<line>" (several files)
        self._records = records
        self.format = fmt
        self.delimiter = delimiter or DELIMITERS.get(fmt, ",")
        self.id_field = id_field
        self.path = path
        self._lines: Iterable[bytes] | None = lines
        self._handle = handle

    def __iter__(self) -> Iterator[Row]:
        lines = self._lines
        self._lines = None
        if lines is None:  # a second pass re-reads the file; stdin can only be read once
            if self.path is None:
                raise InvalidArgumentError(f"{self.name} can be read only once")
            self._handle = _open_binary(self.path)
            lines = _binary_lines(self._handle)
        handle = self._handle
        opened_size = _size(handle) if self.path is not None else None
        delimiter = self.delimiter

        def parse(lines: Iterable[bytes], name: str) -> Iterable[tuple[int, Any, str]]:
            if self._records is not None:  # already parsed (Parquet)
                return self._records
            if self.format == "jsonl":
                return _jsonl_records(lines, name, self.start_line)
            return _csv_records(lines, name, delimiter)

        seen: dict[int, int] = {}  # hash of each declared id -> its line (--id-field)
        try:
            for index, (line, data, why) in enumerate(parse(lines, self.name)):
                if why:
                    row_id = self._unique(self._fallback_id(index, line), line, seen)
                    error = _fail(self.name, line, why)
                    yield Row(index, line, row_id, None, error, row_digest(why))
                    continue
                row_id = self._row_id(data, index, line)
                unique = self._unique(row_id, line, seen)
                if unique != row_id:  # the later row of a duplicate id: an error, not a run
                    first = seen[_id_hash(row_id)]
                    error = _fail(
                        self.name, line, f"id {row_id!r} is used again (first at line {first})"
                    )
                    yield Row(index, line, unique, None, error, row_digest(data))
                    continue
                yield Row(index, line, row_id, data, None, row_digest(data))
            now_size = _size(handle) if handle is not None else None
            if opened_size is not None and now_size is not None and now_size < opened_size:
                raise InputError(
                    f"{self.name}: the file shrank from {opened_size} to {_size(handle)} bytes "
                    "while it was read: the rows after that were not read"
                )
        finally:
            self.close()

    def _unique(self, row_id: str, line: int, seen: dict[int, int]) -> str:
        """``row_id``, or for a repeat of a declared id (``--id-field``) a derived one that no
        other row can have: ``<id>@line-<n>``."""
        if self.id_field is None:
            return row_id  # row numbers are unique by construction
        key = _id_hash(row_id)
        if key in seen:
            return f"{row_id}@line-{line}"
        seen[key] = line
        return row_id

    def _row_id(self, data: dict[str, Any], index: int, line: int) -> str:
        """The id exactly as written: a string as is, a number in its digits."""
        if self.id_field is not None and data.get(self.id_field) not in (None, ""):
            value = data[self.id_field]
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return self._fallback_id(index, line)

    def _fallback_id(self, index: int, line: int) -> str:
        """Row number without --id-field; with it, a row lacking an id is named by its line
        (a declared id equal to it is then a repeat, so none is ever shared). With an
        ``id_scope`` (rows of several files), the file's name and the line: stable across
        reruns however the files are split into blocks."""
        local = str(index) if self.id_field is None else f"line-{line}"
        if self.id_scope is None:
            return local
        return f"{self.id_scope}#{line}" if self.id_field is None else f"{self.id_scope}#{local}"

    def count_rows(self) -> int | None:
        """Number of rows iteration will yield (for a progress total); None for stdin.

        Uses its own file handle, so it may run before, during or after iteration.
        """
        if self.path is None:
            return None
        with _open_binary(self.path) as handle:
            if self.format == "jsonl":
                return sum(1 for n, raw in enumerate(handle) if _content(raw, n).strip())
            try:
                return sum(1 for _ in _csv_records(handle, self.name, self.delimiter))
            except InputError:
                return 0  # a broken header: iteration will report it

    @property
    def has_header(self) -> bool:
        """Delimited text (CSV, TSV): its first line names the columns of every row."""
        return self.format != "jsonl"

    def close(self) -> None:
        """Close the file (never stdin); iteration does this itself when it ends."""
        if self._handle is not None and self.path is not None:
            self._handle.close()
        self._handle = None

    def __enter__(self) -> RowSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")


def _size(handle: IO[Any] | None) -> int | None:
    try:
        return os.fstat(handle.fileno()).st_size if handle is not None else None
    except (OSError, ValueError, AttributeError):
        return None


def _content(raw: bytes, number: int) -> bytes:
    return raw.removeprefix(_BOM) if number == 0 else raw


def _open_binary(path: str) -> IO[bytes]:
    """The file's bytes; a ``.gz`` file is decompressed as it is read."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an input file")
    try:
        if path.lower().endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")  # the RowSource owns and closes it
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open input ({exc.strerror or exc})") from None


def _sniff(lines: Iterator[bytes]) -> tuple[str, Iterator[bytes]]:
    """Peek at the first non-blank line without losing it: '{' means JSONL, else CSV."""
    seen: list[bytes] = []
    for raw in lines:
        seen.append(raw)
        stripped = (raw.removeprefix(_BOM) if len(seen) == 1 else raw).strip()
        if stripped:
            fmt = "jsonl" if stripped.startswith((b"{", b"[")) else "csv"
            if fmt == "csv" and b"\t" in stripped and b"," not in stripped:
                fmt = "tsv"
            return fmt, itertools.chain(seen, lines)
    return "jsonl", iter(seen)


def open_rows(
    path: str,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    stdin: IO[Any] | None = None,
    delimiter: str | None = None,
) -> RowSource:
    """Open ``path`` (``-`` = stdin) for lazy row reading; raises InputError for a bad path.

    The format comes from ``fmt``, else the suffix (.jsonl/.ndjson/.json, .csv or .tsv, each
    maybe with .gz), else the first non-blank character. ``delimiter`` replaces the CSV/TSV
    field separator. ``stdin`` replaces ``sys.stdin`` (tests, embedding).
    """
    if fmt is not None and fmt.lower() not in _FORMATS:
        raise InvalidArgumentError(f"unknown input format {fmt!r}; use jsonl, csv or tsv")
    if delimiter is not None and len(delimiter) != 1:
        raise InvalidArgumentError(f"a delimiter is one character, not {delimiter!r}")
    chosen = _FORMATS[fmt.lower()] if fmt is not None else None
    if path == "-":
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
        lines: Iterator[bytes] = _binary_lines(stream)
        if chosen is None:
            chosen, lines = _sniff(lines)
        if chosen == "jsonl":
            lines = _refuse_json_array(lines, "<stdin>")
        return RowSource("<stdin>", chosen, id_field, lines, None, stream, delimiter)
    handle = _open_binary(path)
    lines = _binary_lines(handle)
    if chosen is None:
        lower = path.lower().removesuffix(".gz")
        if lower.endswith(_JSONL_SUFFIXES):
            chosen = "jsonl"
        elif lower.endswith((".csv", ".tsv")):
            chosen = lower[-3:]
        else:
            chosen, lines = _sniff(lines)
    if chosen == "jsonl":
        lines = _refuse_json_array(lines, path)
    return RowSource(path, chosen, id_field, lines, path, handle, delimiter)


def _refuse_json_array(lines: Iterator[bytes], name: str) -> Iterator[bytes]:
    """A pretty-printed JSON array is one document, not JSON Lines: one clear error up front
    instead of one "not valid JSON" per line."""
    seen: list[bytes] = []
    for raw in lines:
        seen.append(raw)
        stripped = (raw.removeprefix(_BOM) if len(seen) == 1 else raw).strip()
        if stripped:
            if stripped.startswith(b"["):
                shown = name if name != "-" else "FILE"
                raise InputError(
                    f"{name}: is one JSON array, not JSON Lines (one object per line); "
                    f"convert it with: jq -c '.[]' {shown} > rows.jsonl"
                )
            break
    return itertools.chain(seen, lines)
