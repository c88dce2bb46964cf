"""Checks and parsing of ``sglrun batch``'s own flags (inputs, outputs, maps)."""

from __future__ import annotations

import os
import sys
from typing import Any

from sglrun.errors import InputError


def check_batch_flags(params: dict[str, Any]) -> None:
    """The flags of ``batch`` that contradict each other or are out of range."""
    for name in ("window", "limit", "max_failures"):
        count = params.get(name)
        if count is not None and count < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {count}")
    resuming = params.get("resume") or params.get("retry_errors")
    if params.get("overwrite") and resuming:
        raise InputError("--overwrite replaces the output, --resume continues it: give one")
    if params.get("force") and not resuming:
        raise InputError("--force goes with --resume (it accepts a changed input or program)")
    row_timeout = params.get("row_timeout")
    if row_timeout is not None and row_timeout < 0:
        raise InputError(f"--row-timeout must be >= 0 seconds (0: none), got {row_timeout}")


def split_list(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def parse_map(values: list[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values or []:
        param, eq, column = value.partition("=")
        if not eq or not param.strip() or not column.strip():
            raise InputError(f"--map expects param=column, got {value!r}")
        mapping[param.strip()] = column.strip()
    return mapping


def default_output(input_path: str) -> str:
    if input_path == "-":
        return "-"
    directory, base = os.path.split(input_path)
    if base.lower().endswith(".gz"):
        base = base[:-3]
    return os.path.join(directory, f"{os.path.splitext(base)[0] or base}.out.jsonl")


def check_output(output: str, input_path: str) -> None:
    if output == "-":
        import io

        usable = sys.stdout is not None
        if usable:
            try:
                os.fstat(sys.stdout.fileno())
            except io.UnsupportedOperation:  # not a file (a test runner's buffer): fine
                pass
            except (OSError, ValueError):  # descriptor 1 is closed
                usable = False
        if not usable:
            raise InputError("stdout is closed: give the output a file with -o FILE")
        return


def rendered_output(output: str, input_path: str, program: str, replacing: bool) -> str:
    """The journal of a CSV/TSV/Parquet/.jsonl.gz output, after checking the output itself:
    never the input or program, never a non-empty file replaced unasked."""
    from sglrun.batch.render import journal_path
    from sglrun.batch.setup import check_paths

    check_paths(input_path, output, program)
    journal = journal_path(output)
    if os.path.exists(output) and os.path.getsize(output) > 0 and not replacing:
        if not os.path.exists(journal):
            raise InputError(
                f"{output}: exists and is not empty; --overwrite replaces it (once the run is done)"
            )
    return journal


def delimiter_flag(text: str | None) -> str | None:
    """``--delimiter``: one character; ``\\t`` or ``tab`` for a tab."""
    if text is None:
        return None
    chosen = "\t" if text in ("\\t", "tab", "TAB") else text
    if len(chosen) != 1:
        raise InputError(f"--delimiter must be one character (or \\t), got {text!r}")
    return chosen


def parse_include(values: list[str] | None) -> tuple[set[str], tuple[str, ...] | None]:
    """``--include``: the fields, and the columns of ``input:COL1,COL2`` (None: all)."""
    from sglrun.batch.runner import INCLUDE_FIELDS

    input_columns: tuple[str, ...] | None = None
    plain = []
    for value in values or []:  # input:COL1,COL2 takes the rest of its value
        if value.strip().startswith("input:"):
            input_columns = tuple(split_list([value.strip()[len("input:") :]]))
            if not input_columns:
                raise InputError("--include input: names no column (input:COL1,COL2)")
            plain.append("input")
        else:
            plain.append(value)
    fields = set(split_list(plain))
    unknown = sorted(fields - set(INCLUDE_FIELDS))
    if unknown:
        raise InputError(
            f"--include: unknown field(s) {', '.join(unknown)}; "
            f"choose from {','.join(INCLUDE_FIELDS)}"
        )
    return fields, input_columns
