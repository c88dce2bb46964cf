"""Resuming a batch from its own output file.

The output is the checkpoint: every finished row is one flushed JSON line, so after a crash the
ids already written say what is left to do. A SIGKILL can leave the last line half written; that
torn tail is cut off (or completed with its missing newline) so appending can go on safely.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglrun.errors import InputError, InvalidArgumentError

__all__ = ["ResumeState", "prepare_resume", "scan_output"]


@dataclass
class ResumeState:
    """What an existing output file already holds.

    ``skip`` is filled by ``prepare_resume``: the ids the new run must not run again.
    """

    path: str
    done_ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    records: int = 0
    repaired: bool = False
    removed: int = 0
    skip: set[str] = field(default_factory=set)


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # what our stdlib fallback writer may have produced (integers beyond 64 bits)
            return json.loads(raw)
        except ValueError:
            return None


def _lines(handle: Any) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line start, raw line) for the whole file."""
    offset = 0
    for number, raw in enumerate(handle, start=1):
        yield number, offset, raw
        offset += len(raw)


def _record_id(value: Any) -> tuple[str | None, bool]:
    """(id, ok) of a parsed line, or (None, False) when it is not an sglrun record."""
    if not isinstance(value, dict) or "id" not in value or value["id"] is None:
        return None, False
    return str(value["id"]), value.get("error") is None


def scan_output(path: str) -> ResumeState:
    """Read ``path`` and record which ids succeeded or failed; repair a torn last line.

    A missing file is an empty state (nothing to resume). A broken line that is not the last
    one means the file was not written by sglrun alone, and raises InputError naming the line.
    """
    if path == "-":
        raise InvalidArgumentError("cannot resume into stdout; give an output file with -o")
    state = ResumeState(path)
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not an output file")
    if not os.path.exists(path):
        return state
    torn: tuple[int, int, bool] | None = None  # (line, offset, complete record missing "\n")
    size = 0
    try:
        with open(path, "rb") as handle:
            for number, offset, raw in _lines(handle):
                size = offset + len(raw)
                if not raw.strip():
                    continue
                if torn is not None:  # a broken line followed by more data: not a torn tail
                    raise InputError(f"{path}:{torn[0]}: not a complete JSON record")
                value = _parse(raw)
                if value is None:
                    torn = (number, offset, False)
                    continue
                record_id, ok = _record_id(value)
                if record_id is None:
                    raise InputError(f"{path}:{number}: not an sglrun output record (no 'id')")
                if not raw.endswith(b"\n"):
                    torn = (number, offset, True)
                state.records += 1
                if ok:
                    state.done_ok.add(record_id)
                    state.failed.discard(record_id)
                elif record_id not in state.done_ok:
                    state.failed.add(record_id)
    except OSError as exc:
        raise InputError(f"{path}: cannot read output ({exc.strerror or exc})") from None
    if torn is not None:
        _repair(path, torn[1], size, complete=torn[2])
        state.repaired = True
    return state


def _repair(path: str, offset: int, size: int, *, complete: bool) -> None:
    """Finish a whole record cut before its newline, or cut a torn tail off at ``offset``."""
    try:
        if complete:
            with open(path, "ab") as handle:
                handle.write(b"\n")
        else:
            os.truncate(path, offset)
    except OSError as exc:
        raise InputError(f"{path}: cannot repair the torn last line ({exc.strerror})") from None


def prepare_resume(path: str, *, retry_errors: bool) -> ResumeState:
    """Scan ``path`` and work out which ids to skip.

    Without ``retry_errors`` both succeeded and failed ids are skipped. With it, the failed
    records are removed from the file first (temp file + ``os.replace``, so a crash leaves the
    old or the new file, never half of one) and their rows run again: one record per id.
    """
    state = scan_output(path)
    if not retry_errors:
        state.skip = state.done_ok | state.failed
        return state
    state.skip = set(state.done_ok)
    if state.failed:
        state.removed = _drop_records(path, state.failed)
    return state


def _drop_records(path: str, ids: set[str]) -> int:
    """Rewrite ``path`` without the records whose id is in ``ids``; returns how many went."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".sglrun-resume-", suffix=".jsonl")
    except OSError as exc:
        raise InputError(
            f"{path}: cannot rewrite output to retry errors ({exc.strerror})"
        ) from None
    removed = 0
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            for raw in src:
                if not raw.strip():
                    continue
                record_id, _ = _record_id(_parse(raw))
                if record_id in ids:
                    removed += 1
                    continue
                out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(path, temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return removed
