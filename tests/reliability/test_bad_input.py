"""Bad input: one clear line naming the file and line (or the argument); good rows still finish.

A malformed row costs one error record (its message names ``file:line``) and exit 1; a problem
that stops the whole run (bad program, empty input, unwritable output, bad flag or config) is
one ``sglrun: error:`` line on stderr, exit 2, before any row runs.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from .faulty_server import FaultyServer
from .helpers import Run, clean_env, read_records, run_cli

PROGRAM = '''\
import sglrun as sgl


@sgl.function
def prog(s, text: str, n: int = 1):
    s += "Question about row=" + text + " times " + str(n) + "\\n"
    s += "A:" + sgl.gen("answer", max_tokens=4)
'''


def batch(tmp_path: Path, input_name: str, *extra: str, program: str = "prog.py") -> Run:
    # Each call starts the output anew (several runs of one test share a directory).
    args = ["batch", program, input_name, "-o", "out.jsonl", "--overwrite", "--backend", "fake",
            *extra]  # fmt: skip
    return run_cli(args, cwd=tmp_path, env=clean_env(SGLRUN_FAKE_REPLIES='["hi"]'), timeout=60)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "prog.py").write_text(PROGRAM)
    return tmp_path


def jsonl(*rows: dict | bytes) -> bytes:
    return b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows)


EXTRA_KEY_ROWS = jsonl(
    {"id": "a", "text": "x"}, {"id": "b", "text": "y", "extra": 1}, {"id": "c", "text": "z"}
)


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.output, run.describe()
    assert "internal error" not in run.output, run.describe()


def one_error_line(run: Run, *words: str) -> str:
    """Exit 2 with exactly one stderr line, ``sglrun: error: ...``, containing ``words``."""
    no_traceback(run)
    assert run.returncode == 2, run.describe()
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines}"
    line = lines[0]
    assert line.startswith("sglrun: error: "), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


def nothing_ran(work: Path) -> None:
    output = work / "out.jsonl"
    assert not output.exists() or output.stat().st_size == 0, output.read_text()[:500]


def by_id(work: Path) -> dict[str, dict]:
    records = read_records(work / "out.jsonl")
    counts = Counter(record["id"] for record in records)
    assert max(counts.values()) == 1, f"duplicate ids: {counts.most_common(3)}"
    return {record["id"]: record for record in records}


def row_error(record: dict, *words: str) -> None:
    error = record["error"]
    assert error is not None, record
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], (word, error)


def ok(record: dict) -> None:
    assert record["error"] is None and record["vars"] == {"answer": "hi"}, record


# ------------------------------------------------------------------------- bad rows


def test_malformed_jsonl_line(work):
    (work / "in.jsonl").write_bytes(
        jsonl({"id": "a", "text": "x"}, b'{"id": "b", "text": "y"\n', {"id": "c", "text": "z"})
    )
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    assert len(records) == 3
    ok(records[0])
    ok(records[2])
    row_error(records[1], "in.jsonl:2:", "not valid JSON")
    assert "1 of 3 rows failed" in run.stderr


@pytest.mark.parametrize(
    "second_line",
    [b'{"id": "2", "text": "y"\n', b'{"text": "y"}\n'],
    ids=["malformed", "without-id"],
)
def test_a_row_without_a_readable_id_does_not_take_another_rows_id(work, second_line):
    """With --id-field id and ids "1".."3", line 2 (malformed, or lacking the id key) gets
    its position as id, "1", which is the first row's id: two records with id "1", and
    --resume then treats both rows as one."""
    (work / "in.jsonl").write_bytes(
        jsonl({"id": "1", "text": "x"}, second_line, {"id": "3", "text": "z"})
    )
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    records = read_records(work / "out.jsonl")
    ids = Counter(record["id"] for record in records)
    assert len(records) == 3
    assert ids["1"] == 1 and ids["3"] == 1, f"ids written: {dict(ids)}"


def test_csv_row_with_a_missing_column(work):
    (work / "in.csv").write_text("id,text,n\na,x,1\nb,y\nc,z,2\n")
    run = batch(work, "in.csv", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    assert len(records) == 3
    ok(records[0])
    ok(records[2])
    row_error(records[1], "in.csv:3:", "expected 3 fields")


def test_wrong_type_for_an_int_parameter(work):
    (work / "in.jsonl").write_bytes(
        jsonl(
            {"id": "a", "text": "x", "n": 2},
            {"id": "b", "text": "y", "n": "seven"},
            {"id": "c", "text": "z", "n": [1]},
            {"id": "d", "text": "w", "n": "3"},
        )
    )
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = by_id(work)
    ok(records["a"])
    ok(records["d"])
    row_error(records["b"], "in.jsonl:2:", "'n'", "int", "seven")
    row_error(records["c"], "in.jsonl:3:", "'n'", "int")
    assert records["b"]["error"]["type"] == "InputError"


def test_binary_garbage_lines_among_good_rows(work):
    garbage = random.Random(0).randbytes(400).replace(b"\n", b"") + b"\n"
    (work / "in.jsonl").write_bytes(
        jsonl({"id": "a", "text": "x"}, garbage, b"\x00\xff\xfe\x00\n", {"id": "b", "text": "y"})
    )
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    assert len(records) == 4
    ok(records[0])
    ok(records[3])
    row_error(records[1], "in.jsonl:2:")
    row_error(records[2], "in.jsonl:3:")


def test_a_wholly_binary_file_is_one_error_line(work):
    (work / "in.dat").write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(3000))
    run = batch(work, "in.dat")
    one_error_line(run, "in.dat")
    nothing_ran(work)


@pytest.mark.parametrize(
    "content",
    [b"a\rb\n\xff\xfe\x00\x01\nid,text\nx,1\n", b"a\rb\nid,text\nx,1\n"],
    ids=["then-undecodable", "then-header"],
)
def test_unparseable_csv_header_fails_before_any_row(work, content):
    """A CSV whose first line (the header) is not valid CSV (a bare CR) must fail as a header
    error, exit 2, before any row runs. The reader instead yields that line as a data row
    (no header yet), takes the next line as the header, and either stops there (exit 1 after a
    record, the rest of the file unread) or runs the later rows under the wrong header."""
    (work / "in.dat").write_bytes(content)
    run = batch(work, "in.dat")
    no_traceback(run)
    written = read_records(work / "out.jsonl") if (work / "out.jsonl").exists() else []
    assert run.returncode == 2 and not written, (
        f"exit {run.returncode} with {len(written)} record(s) {written}; stderr: {run.stderr}"
    )
    one_error_line(run, "in.dat:1")


def test_empty_input_file(work):
    (work / "in.jsonl").write_bytes(b"")
    run = batch(work, "in.jsonl")
    one_error_line(run, "in.jsonl", "empty")
    nothing_ran(work)
    (work / "blank.jsonl").write_bytes(b"\n  \n\n")
    one_error_line(batch(work, "blank.jsonl"), "blank.jsonl")


def test_a_10_mb_row(work):
    big = "w" * 10_000_000
    (work / "in.jsonl").write_bytes(
        jsonl(
            {"id": "small", "text": "x"}, {"id": "big", "text": big}, {"id": "after", "text": "y"}
        )
    )
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 0, run.describe()
    assert run.seconds < 30
    records = by_id(work)
    assert set(records) == {"small", "big", "after"}
    for record in records.values():
        ok(record)
    # and in a CSV, where the csv module refuses fields over 128 KiB by default
    (work / "in.csv").write_text(f"id,text\nsmall,x\nbig,{big}\nafter,y\n")
    run = batch(work, "in.csv", "--id-field", "id")
    assert run.returncode == 0, run.describe()
    assert set(by_id(work)) == {"small", "big", "after"}


def test_unknown_parameter_with_strict_is_a_row_error(work):
    (work / "in.jsonl").write_bytes(EXTRA_KEY_ROWS)
    run = batch(work, "in.jsonl", "--id-field", "id", "--strict")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = by_id(work)
    ok(records["a"])
    ok(records["c"])
    row_error(records["b"], "in.jsonl:2:", "'extra'")


def test_unknown_parameter_without_strict_runs_the_row(work):
    (work / "in.jsonl").write_bytes(EXTRA_KEY_ROWS)
    run = batch(work, "in.jsonl", "--id-field", "id")
    no_traceback(run)
    assert run.returncode == 0, run.describe()
    assert all(record["error"] is None for record in by_id(work).values())


def test_unknown_parameter_without_strict_is_warned_about(work):
    """Without --strict the row runs, but a key that fills no parameter (often a typo of an
    optional one, silently using its default) deserves one warning line naming it."""
    (work / "in.jsonl").write_bytes(EXTRA_KEY_ROWS)
    run = batch(work, "in.jsonl", "--id-field", "id")
    assert run.returncode == 0, run.describe()
    warnings = [line for line in run.stderr.splitlines() if "extra" in line]
    assert len(warnings) == 1, f"no single warning naming the unknown key 'extra':\n{run.stderr}"
    assert "in.jsonl" in warnings[0]


# ------------------------------------------------------------------------- bad programs


def test_program_with_a_syntax_error(work):
    (work / "broken.py").write_text("import sglrun as sgl\n\n\ndef prog(s:\n    pass\n")
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    one_error_line(batch(work, "in.jsonl", program="broken.py"), "broken.py:4", "syntax")
    nothing_ran(work)


def test_program_without_a_function(work):
    (work / "plain.py").write_text("import sglrun as sgl\n\n\ndef prog(s, text):\n    pass\n")
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    one_error_line(batch(work, "in.jsonl", program="plain.py"), "plain.py", "@function")
    nothing_ran(work)


def test_program_that_fails_while_loading(work):
    (work / "boom.py").write_text("import sglrun as sgl\n\nraise RuntimeError('no config')\n")
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    one_error_line(batch(work, "in.jsonl", program="boom.py"), "boom.py:3", "no config")


def test_program_that_raises_in_some_rows(work):
    (work / "raises.py").write_text(
        "import sglrun as sgl\n\n\n@sgl.function\ndef prog(s, text: str):\n"
        "    if text.startswith('boom'):\n"
        "        raise ValueError(f'cannot handle {text}')\n"
        "    s += 'Q ' + text + '\\n' + sgl.gen('answer', max_tokens=4)\n"
    )
    rows = [{"id": f"r{i}", "text": "boom" + str(i) if i % 10 == 3 else "fine"} for i in range(50)]
    (work / "in.jsonl").write_bytes(jsonl(*rows))
    run = batch(work, "in.jsonl", "--id-field", "id", program="raises.py")
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    records = by_id(work)
    assert len(records) == 50
    for i in range(50):
        record = records[f"r{i}"]
        if i % 10 == 3:
            assert record["error"] == {"type": "ValueError", "message": f"cannot handle boom{i}"}
        else:
            ok(record)
    assert "5 of 50 rows failed" in run.stderr


# ------------------------------------------------------------------------- bad outputs


@pytest.mark.parametrize(
    "output, words",
    [
        ("missing-dir/out.jsonl", ["missing-dir", "does not exist"]),
        (".", ["is a directory"]),
        ("prog.py/out.jsonl", ["prog.py"]),
    ],
)
def test_unwritable_output_fails_before_any_row(work, output, words):
    (work / "in.jsonl").write_bytes(jsonl(*({"id": f"r{i}", "text": f"r{i}"} for i in range(20))))
    with FaultyServer(max_lifetime=60) as server:
        args = ["batch", "prog.py", "in.jsonl", "-o", output, "--backend", "sglang",
                "--url", server.url, "--id-field", "id"]  # fmt: skip
        run = run_cli(args, cwd=work, timeout=60)
        generated = server.since()
    one_error_line(run, *words)
    assert not generated, f"{len(generated)} requests reached the server before the error"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(work):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
        args = ["batch", "prog.py", "in.jsonl", "-o", "locked/out.jsonl", "--backend", "fake"]
        one_error_line(run_cli(args, cwd=work, timeout=60), "locked")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_output_that_fails_on_write_is_reported(work):
    (work / "in.jsonl").write_bytes(jsonl(*({"id": f"r{i}", "text": f"r{i}"} for i in range(20))))
    args = ["batch", "prog.py", "in.jsonl", "-o", "/dev/full", "--backend", "fake"]
    run = run_cli(args, cwd=work, env=clean_env(SGLRUN_FAKE_REPLIES='["hi"]'), timeout=60)
    no_traceback(run)
    assert run.returncode == 1, run.describe()
    assert "/dev/full: cannot write output" in run.stderr


# ------------------------------------------------------------------------- bad flags, config


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_num_threads(work, value):
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    run = batch(work, "in.jsonl", "--num-threads", value)
    one_error_line(run, "--num-threads", value)
    nothing_ran(work)


def test_config_file_with_a_typo(work):
    (work / "sglrun.yaml").write_text("temperature: 0\nretries: 2\ntemprature: 0.5\n")
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    line = one_error_line(batch(work, "in.jsonl"), "sglrun.yaml", "'temprature'", "'temperature'")
    assert "did you mean" in line
    nothing_ran(work)
    shown = run_cli(["config", "show"], cwd=work, timeout=60)
    one_error_line(shown, "sglrun.yaml", "'temprature'", "did you mean 'temperature'")


def test_config_value_of_the_wrong_type(work):
    (work / "sglrun.yaml").write_text("retries: many\n")
    (work / "in.jsonl").write_bytes(jsonl({"text": "x"}))
    one_error_line(batch(work, "in.jsonl"), "sglrun.yaml", "retries", "integer")
