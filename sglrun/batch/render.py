"""Outputs other than JSON Lines: CSV, TSV, Parquet and gzipped JSONL.

The records of a run always go to a JSON Lines journal first (``.NAME.sglrun-records.jsonl``
beside the output): it is what the lock, the manifest, ``--resume`` and the torn-line repair
work on. When the run ends, the output is rendered from the whole journal to a temporary name
and renamed into place, so a reader never sees a half-written CSV or Parquet file and a
resumed run renders every row, old and new.

Table columns: ``id``, every variable (in order of first appearance), ``error`` (``Type:
message``, empty when the row succeeded), then the ``--include input:COLS`` columns as
``input.COL``. Lists and objects are JSON text, so every column has one type.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
from collections.abc import Iterator
from typing import Any

import orjson

from sglrun.errors import InputError

__all__ = [
    "RENDERED",
    "UNWRITTEN",
    "arrow_table",
    "check_kind",
    "journal_path",
    "output_kind",
    "records_table",
    "render",
    "write_parquet",
]

#: Output suffix -> kind; anything else is written as JSON Lines directly.
RENDERED = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl.gz": "jsonl.gz"}


#: Formats people ask for that sglrun does not write: refused rather than written as JSONL.
UNWRITTEN = (".xlsx", ".xls", ".ods", ".csv.gz", ".tsv.gz", ".feather", ".arrow", ".avro",
             ".orc", ".xml", ".html")  # fmt: skip


def output_kind(path: str) -> str | None:
    """The rendered kind of ``path`` by its suffix, None for plain JSON Lines (or ``-``)."""
    lower = path.lower()
    return next((kind for suffix, kind in RENDERED.items() if lower.endswith(suffix)), None)


def journal_path(path: str) -> str:
    """Where the records of a rendered output are kept while (and after) it runs."""
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.sglrun-records.jsonl")


def _records(journal: str) -> Iterator[dict[str, Any]]:
    with open(journal, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    yield orjson.loads(raw)
                except orjson.JSONDecodeError:  # a torn last line: resume repairs it
                    continue


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _table(journal: str, input_columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    return records_table(list(_records(journal)), input_columns)  # built in memory anyway


def records_table(
    records: list[dict[str, Any]], input_columns: list[str]
) -> tuple[list[str], list[list[Any]]]:
    """The header and the rows of the table the records make (see the module docstring)."""
    names: dict[str, None] = {}
    for record in records:
        for name in record.get("vars") or {}:
            names.setdefault(name, None)
    header = ["id", *names, "error", *(f"input.{column}" for column in input_columns)]
    rows = []
    for record in records:
        variables = record.get("vars") or {}
        error = record.get("error")
        given = record.get("input") or {}
        rows.append([
            record.get("id"),
            *(_cell(variables.get(name)) for name in names),
            f"{error.get('type')}: {error.get('message')}" if error else None,
            *(_cell(given.get(column)) for column in input_columns),
        ])  # fmt: skip
    return header, rows


def render(journal: str, output: str, kind: str, input_columns: list[str]) -> None:
    """Write ``output`` (of ``kind``) from every record in ``journal``, atomically."""
    directory, base = os.path.split(output)
    temporary = os.path.join(directory, f".{base}.sglrun-render")
    try:
        if kind == "jsonl.gz":
            with open(journal, "rb") as source, gzip.open(temporary, "wb") as target:
                shutil.copyfileobj(source, target)
        elif kind in ("csv", "tsv"):
            header, rows = _table(journal, input_columns)
            with open(temporary, "w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle, delimiter="," if kind == "csv" else "\t")
                writer.writerow(header)
                writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
        elif kind == "parquet":
            _parquet(journal, temporary, input_columns)
        else:  # pragma: no cover - output_kind names every kind
            raise ValueError(kind)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _parquet(journal: str, target: str, input_columns: list[str]) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(
            "Parquet output needs pyarrow: pip install 'sglrun[parquet]' (the records are "
            f"kept in {journal})"
        ) from None
    write_parquet(*_table(journal, input_columns), target)


def write_parquet(header: list[str], rows: list[list[Any]], target: str) -> None:
    """A Parquet file of the table."""
    import pyarrow.parquet as pq

    pq.write_table(arrow_table(header, rows), target)


def arrow_table(header: list[str], rows: list[list[Any]]) -> Any:
    """The table as a ``pyarrow.Table``; a column of mixed types is kept as text."""
    import pyarrow as pa

    columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep each as text
            arrays[name] = pa.array([None if v is None else str(v) for v in values])
    return pa.table(arrays)


def check_kind(path: str) -> None:
    """Refuse now (exit 2) a format not written, or Parquet without pyarrow."""
    lower = path.lower()
    unwritten = next((suffix for suffix in UNWRITTEN if lower.endswith(suffix)), None)
    if unwritten is not None:
        raise InputError(
            f"{path}: unknown output format {unwritten!r}; sglrun writes .jsonl (the "
            "default), .jsonl.gz, .csv, .tsv or .parquet"
        )
    if output_kind(path) == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(
                f"{path}: Parquet output needs pyarrow: pip install 'sglrun[parquet]'"
            ) from None
