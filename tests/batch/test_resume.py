"""Resuming from an output file: done/failed ids, torn-line repair, retrying errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sglrun.batch.resume import prepare_resume, scan_output
from sglrun.batch.writers import RecordWriter, make_record
from sglrun.errors import InputError, InvalidArgumentError


def line(id: str, error: str | None = None) -> bytes:
    record = make_record(id, {"answer": f"a{id}"}, error)
    return json.dumps(record).encode() + b"\n"


def ids_in(path: Path) -> list[str]:
    return [json.loads(raw)["id"] for raw in path.read_text().splitlines() if raw.strip()]


def test_scan_sorts_ids_into_ok_and_failed(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(line("0") + line("1", "boom") + b"\n" + line("2", "bad") + line("2"))
    state = scan_output(str(path))
    assert state.done_ok == {"0", "2"}  # "2" was retried and succeeded later
    assert state.failed == {"1"}
    assert state.records == 4
    assert state.repaired is False


def test_missing_output_is_an_empty_state(tmp_path):
    state = scan_output(str(tmp_path / "none.jsonl"))
    assert state.done_ok == set() and state.failed == set() and not state.repaired


def test_torn_last_line_is_truncated(tmp_path):
    path = tmp_path / "out.jsonl"
    with RecordWriter(str(path), append=False) as writer:
        writer.write(make_record("0", {"a": 1}, None))
        writer.write(make_record("1", {"a": 2}, None))
    complete = path.read_bytes()
    half = line("2")[:15]  # a SIGKILL in the middle of the third write
    with open(path, "ab") as handle:
        handle.write(half)
    state = scan_output(str(path))
    assert state.repaired is True
    assert state.done_ok == {"0", "1"}
    assert path.read_bytes() == complete
    # appending now yields a valid file with the missing row
    with RecordWriter(str(path), append=True) as writer:
        writer.write(make_record("2", {"a": 3}, None))
    assert ids_in(path) == ["0", "1", "2"]
    assert scan_output(str(path)).repaired is False


def test_torn_last_line_with_newline_but_invalid_json(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(line("0") + b'{"id": "1", "va\n\n')
    state = scan_output(str(path))
    assert state.repaired and state.done_ok == {"0"}
    assert path.read_bytes() == line("0")


def test_complete_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(line("0") + line("1")[:-1])
    state = scan_output(str(path))
    assert state.repaired and state.done_ok == {"0", "1"}
    assert path.read_bytes() == line("0") + line("1")


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    original = line("0") + b'{"id": "1", "va\n' + line("2")
    path.write_bytes(original)
    with pytest.raises(InputError, match=r"out.jsonl:2: not a complete JSON record"):
        scan_output(str(path))
    assert path.read_bytes() == original  # nothing is "repaired" away


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"question": "q"}\n')
    with pytest.raises(InputError, match=r"inputs.jsonl:1: not an sglrun output record"):
        scan_output(str(path))
    with pytest.raises(InputError, match="is a directory"):
        scan_output(str(tmp_path))
    with pytest.raises(InvalidArgumentError):
        scan_output("-")


def test_prepare_resume_without_retry_skips_failed_too(tmp_path):
    path = tmp_path / "out.jsonl"
    content = line("0") + line("1", "boom") + line("2")
    path.write_bytes(content)
    state = prepare_resume(str(path), retry_errors=False)
    assert state.skip == {"0", "1", "2"}
    assert state.removed == 0
    assert path.read_bytes() == content


def test_prepare_resume_with_retry_removes_failed_records(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(
        line("0") + line("1", "boom") + line("2") + line("3", "x") + line("1", "again")
    )
    os.chmod(path, 0o640)
    state = prepare_resume(str(path), retry_errors=True)
    assert state.skip == {"0", "2"}
    assert state.failed == {"1", "3"}
    assert state.removed == 3
    assert ids_in(path) == ["0", "2"]
    assert (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left
    # the retried rows are appended: still exactly one record per id
    with RecordWriter(str(path), append=True) as writer:
        for row_id in sorted(state.failed):
            writer.write(make_record(row_id, {}, None))
    final = ids_in(path)
    assert sorted(final) == ["0", "1", "2", "3"] and len(final) == len(set(final))


def test_prepare_resume_repairs_then_retries(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(line("0", "boom") + line("1") + line("2")[:9])
    state = prepare_resume(str(path), retry_errors=True)
    assert state.repaired and state.skip == {"1"}
    assert path.read_bytes() == line("1")


def test_a_full_disk_while_dropping_records_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from sglrun.batch import resume

    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "0", "vars": {}, "error": {"type": "X", "message": "m"}}\n')
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume.os, "fsync", full)
    with pytest.raises(InputError, match="No space left on device.*unchanged"):
        prepare_resume(str(path), retry_errors=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left
