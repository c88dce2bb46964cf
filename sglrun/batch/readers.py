"""Input rows for the batch runner: lazy JSONL/CSV/stdin reading and argument conversion.

Rows are streamed line by line so a multi-gigabyte input never sits in memory, and a malformed
line becomes one ``Row`` with an ``InputError`` instead of aborting the whole batch: one bad row
out of a million should cost one error record, not the run.
"""

from __future__ import annotations

import csv
import inspect
import itertools
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from sglrun.errors import InputError, InvalidArgumentError

__all__ = ["ParamSpec", "Row", "RowSource", "convert_row", "open_rows", "param_specs"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FORMATS = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "csv": "csv"}
_BOM = b"\xef\xbb\xbf"
# csv refuses fields over 128 KiB by default; a 10 MB prompt is a legitimate row.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Row:
    """One data row; ``error`` is set (and ``data`` is None) when the line was malformed."""

    index: int
    line: int
    id: str
    data: dict[str, Any] | None
    error: InputError | None = None


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


def _parse_json_line(text: str) -> tuple[Any, str]:
    """Parsed value or an error text; orjson for speed, the stdlib for its precise messages."""
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


def _jsonl_records(lines: Iterable[bytes], name: str) -> Iterator[tuple[int, Any, str]]:
    """(line number, object or None, error) for every non-blank line."""
    for number, raw in enumerate(lines, start=1):
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


def _csv_records(lines: Iterable[bytes], name: str) -> Iterator[tuple[int, Any, str]]:
    """(line number, dict or None, error) per CSV record; the first record is the header."""
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    feed = _LineCounter(lines)
    reader = csv.reader(feed)
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
    repeated = sorted({column for column in header if header.count(column) > 1})
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
    ) -> None:
        self.name = name
        self.format = fmt
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
        parse = _jsonl_records if self.format == "jsonl" else _csv_records
        try:
            for index, (line, data, why) in enumerate(parse(lines, self.name)):
                if why:
                    row_id = self._fallback_id(index, line)
                    yield Row(index, line, row_id, None, _fail(self.name, line, why))
                else:
                    yield Row(index, line, self._row_id(data, index, line), data)
        finally:
            self.close()

    def _row_id(self, data: dict[str, Any], index: int, line: int) -> str:
        if self.id_field is not None and data.get(self.id_field) not in (None, ""):
            return str(data[self.id_field])
        return self._fallback_id(index, line)

    def _fallback_id(self, index: int, line: int) -> str:
        """Row number without --id-field; with it, a row lacking an id is named by its line,
        so it can never take the id another row declares."""
        return str(index) if self.id_field is None else f"line-{line}"

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
                return sum(1 for _ in _csv_records(handle, self.name))
            except InputError:
                return 0  # a broken header: iteration will report it

    def close(self) -> None:
        """Close the file (never stdin); iteration does this itself when it ends."""
        if self._handle is not None and self.path is not None:
            self._handle.close()
        self._handle = None

    def __enter__(self) -> RowSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _content(raw: bytes, number: int) -> bytes:
    return raw.removeprefix(_BOM) if number == 0 else raw


def _open_binary(path: str) -> IO[bytes]:
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an input file")
    try:
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
            fmt = "jsonl" if stripped.startswith(b"{") else "csv"
            return fmt, itertools.chain(seen, lines)
    return "jsonl", iter(seen)


def open_rows(
    path: str,
    *,
    fmt: str | None = None,
    id_field: str | None = None,
    stdin: IO[Any] | None = None,
) -> RowSource:
    """Open ``path`` (``-`` = stdin) for lazy row reading; raises InputError for a bad path.

    The format comes from ``fmt``, else the suffix (.jsonl/.ndjson/.json or .csv), else the
    first non-blank character. ``stdin`` replaces ``sys.stdin`` (tests, embedding).
    """
    if fmt is not None and fmt.lower() not in _FORMATS:
        raise InvalidArgumentError(f"unknown input format {fmt!r}; use jsonl or csv")
    chosen = _FORMATS[fmt.lower()] if fmt is not None else None
    if path == "-":
        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", sys.stdin)
        lines: Iterator[bytes] = _binary_lines(stream)
        if chosen is None:
            chosen, lines = _sniff(lines)
        return RowSource("<stdin>", chosen, id_field, lines, None, stream)
    handle = _open_binary(path)
    lines = _binary_lines(handle)
    if chosen is None:
        lower = path.lower()
        if lower.endswith(_JSONL_SUFFIXES):
            chosen = "jsonl"
        elif lower.endswith(".csv"):
            chosen = "csv"
        else:
            chosen, lines = _sniff(lines)
    return RowSource(path, chosen, id_field, lines, path, handle)


# ----------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class ParamSpec:
    """One keyword parameter of a program function (the state parameter ``s`` excluded)."""

    name: str
    annotation: Any = None
    has_default: bool = False
    default: Any = None


def param_specs(func: Callable[..., Any]) -> list[ParamSpec]:
    """The parameters a row can fill: every parameter after the first (the state ``s``)."""
    signature = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an unresolvable forward reference: fall back per parameter below
        hints = {}
    params = list(signature.parameters.values())
    if not params:
        raise InvalidArgumentError(f"{getattr(func, '__name__', func)!r} has no state parameter")
    specs = []
    for param in params[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = None
        elif isinstance(annotation, str):  # evaluate it as get_type_hints would; unknown = None
            try:
                annotation = eval(annotation, dict(getattr(func, "__globals__", {})))
            except Exception:
                annotation = None
        has_default = param.default is not inspect.Parameter.empty
        default = param.default if has_default else None
        specs.append(ParamSpec(param.name, annotation, has_default, default))
    return specs


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class _Mismatch(Exception):
    """The value does not fit the annotation."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is not None:
        return getattr(origin, "__name__", str(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation``; raises _Mismatch when it cannot be."""
    if annotation is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, typing.get_args(annotation))
    if origin is typing.Literal:
        for choice in typing.get_args(annotation):
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise _Mismatch
    target = origin or annotation
    if annotation is type(None):
        if value is None or value == "":
            return None
        raise _Mismatch
    if target is bool:
        return _to_bool(value)
    if target is int:
        return _to_int(value)
    if target is float:
        return _to_float(value)
    if target is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if target in (list, dict, tuple):
        if isinstance(value, str):
            value, why = _parse_json_line(value)
            if why:
                raise _Mismatch
        if target is tuple and isinstance(value, list):
            return tuple(value)
        if isinstance(value, target):
            return value
        raise _Mismatch
    if isinstance(target, type) and not isinstance(value, target):
        raise _Mismatch
    return value


def _convert_union(value: Any, members: tuple[Any, ...]) -> Any:
    if type(None) in members and (value is None or value == ""):
        return None
    for member in members:  # a value already of a member type stays as it is
        if isinstance(member, type) and member is not type(None) and type(value) is member:
            return value
    for member in members:
        if member is type(None):
            continue
        try:
            return _convert(value, member)
        except _Mismatch:
            continue
    raise _Mismatch


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise _Mismatch


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    number = _to_float(value)  # "3.0" from a spreadsheet export is still 3
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if number.is_integer():
        return int(number)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise _Mismatch from None


def _shorten(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def convert_row(
    data: dict[str, Any],
    params: list[ParamSpec],
    *,
    mapping: dict[str, str] | None = None,
    strict: bool = False,
    source: str = "",
    id_field: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for one row; raises InputError naming the column and the problem.

    ``mapping`` is ``{parameter: column}``; ``source`` (e.g. ``"in.csv:7"``) prefixes messages.
    An empty CSV cell for a non-string parameter with a default means "use the default".
    """
    prefix = f"{source}: " if source else ""
    by_name = {spec.name: spec for spec in params}
    mapping = dict(mapping or {})
    for param in mapping:
        if param not in by_name:
            known = ", ".join(by_name) or "none"
            raise InvalidArgumentError(f"--map names {param!r}, which is not a parameter ({known})")
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for spec in params:
        column = mapping.get(spec.name, spec.name)
        if column not in data:
            if not spec.has_default:
                via = "" if column == spec.name else f" (column {column!r})"
                missing.append(spec.name + via)
            continue
        value = data[column]
        if _use_default(value, spec):
            continue
        try:
            kwargs[spec.name] = _convert(value, spec.annotation)
        except _Mismatch:
            raise InputError(
                f"{prefix}column {column!r}: expected {_type_name(spec.annotation)}, "
                f"got {_shorten(value)}"
            ) from None
    if missing:
        raise InputError(f"{prefix}missing required argument(s): {', '.join(missing)}")
    if strict:
        known_columns = set(mapping.values()) | {n for n in by_name if n not in mapping}
        if id_field is not None:
            known_columns.add(id_field)
        unknown = [column for column in data if column not in known_columns]
        if unknown:
            names = ", ".join(repr(column) for column in unknown)
            raise InputError(
                f"{prefix}unknown column(s) {names}; parameters are {', '.join(by_name) or 'none'}"
            )
    return kwargs


def _use_default(value: Any, spec: ParamSpec) -> bool:
    """An empty cell or null that the annotation cannot hold means "not given": keep the default."""
    if not spec.has_default or (value is not None and value != ""):
        return False
    try:
        _convert(value, spec.annotation)
    except _Mismatch:
        return True
    return False
