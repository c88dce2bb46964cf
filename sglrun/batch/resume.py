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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sglrun.batch.manifest import manifest_path
from sglrun.batch.readers import Row, parse_json
from sglrun.errors import InputError, InvalidArgumentError

__all__ = ["ResumeState", "prepare_resume", "scan_output", "verify_resume"]


@dataclass
class ResumeState:
    """What an existing output file already holds.

    ``digests`` maps every id to the digest of the row its record came from (None for a
    record written without one). ``skip`` is filled by ``prepare_resume``: the ids the new run
    must not run again (their rows must still have the digest ``digests`` gives).
    """

    path: str
    done_ok: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    digests: dict[str, str | None] = field(default_factory=dict)
    records: int = 0
    repaired: bool = False
    removed: int = 0
    skip: set[str] = field(default_factory=set)


def _parse(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except ValueError:
        try:  # what our stdlib fallback writer may have produced (lone surrogates, escaped)
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
                digest = value.get("digest")
                state.digests[record_id] = digest if isinstance(digest, str) else None
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


def prepare_resume(
    path: str, *, retry_errors: bool, drop: set[str] | None = None, state: ResumeState | None = None
) -> ResumeState:
    """Scan ``path`` (unless ``state`` is its scan already) and work out which ids to skip.

    Without ``retry_errors`` both succeeded and failed ids are skipped. With it, the failed
    records are removed from the file first (temp file + ``os.replace``, so a crash leaves the
    old or the new file, never half of one) and their rows run again: one record per id. The
    records of ``drop`` (rows that changed, rows gone from the input) are removed the same way.
    """
    state = state if state is not None else scan_output(path)
    remove = set(drop or ()) | (state.failed if retry_errors else set())
    state.skip = (state.done_ok | state.failed) - remove
    if remove:
        state.removed = _drop_records(path, remove)
    return state


def verify_resume(
    state: ResumeState,
    manifest: dict[str, Any] | None,
    *,
    id_field: str | None,
    program: str,
    rows: Iterable[Row] | None,
    force: bool,
) -> set[str]:
    """Check that the output can go on from this input and program; raise ``InputError`` (one
    line) if not. With ``force``, return the ids whose records must go instead: rows that
    changed since they were written and rows no longer in the input (they run again or
    vanish). ``rows`` is the input read once more (None for stdin: its rows are checked as they
    are read)."""
    path = state.path
    if state.records == 0:
        return set()
    if manifest is None:
        raise InputError(
            f"{path}: not written by sglrun batch (no {os.path.basename(manifest_path(path))} "
            "beside it): refusing to resume into it; choose another -o, or --overwrite"
        )
    if any(digest is None for digest in state.digests.values()):
        raise InputError(
            f"{path}: its records carry no row digests (written by an older sglrun), so they "
            "cannot be checked against the input; start again with --overwrite"
        )
    if manifest.get("id_field") != id_field:
        before = _id_scheme(manifest.get("id_field"))
        raise InputError(
            f"{path} was written with ids from {before}, this run takes them from "
            f"{_id_scheme(id_field)}: resuming would mix rows up; give the same --id-field, "
            "or start again with --overwrite"
        )
    if manifest.get("program", {}).get("fingerprint") != program and not force:
        raise InputError(
            f"{path} was written by another version of the program "
            f"({manifest.get('program', {}).get('path', '?')}); add --force to resume anyway "
            "(the records already written stay as they are)"
        )
    if rows is None:
        return set()
    changed: list[tuple[str, int]] = []
    seen: set[str] = set()
    for row in rows:
        written = state.digests.get(row.id)
        if written is None:
            continue
        seen.add(row.id)
        if written != row.digest:
            changed.append((row.id, row.line))
    gone = sorted(set(state.digests) - seen)
    if (changed or gone) and not force:
        parts = []
        if changed:
            first, line = changed[0]
            parts.append(f"{len(changed)} rows changed since their records were written "
                         f"(first: id {first!r}, input line {line})")  # fmt: skip
        if gone:
            parts.append(f"{len(gone)} records belong to no row of the input (first: id "
                         f"{gone[0]!r})")  # fmt: skip
        raise InputError(
            f"{path}: {'; '.join(parts)}: the input was edited, reordered or is another file. "
            "Start again with --overwrite, or add --force to run the changed rows again and "
            "drop the records of rows no longer in the input"
        )
    return {row_id for row_id, _ in changed} | set(gone)


def _id_scheme(id_field: Any) -> str:
    return f"--id-field {id_field}" if id_field else "row numbers"


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
    except BaseException as exc:
        if os.path.exists(temp):
            os.unlink(temp)
        if isinstance(exc, OSError):  # a full disk, say: the output is as it was
            raise InputError(
                f"{path}: cannot rewrite the output to run records again "
                f"({exc.strerror or exc}); it is unchanged"
            ) from None
        raise
    return removed
