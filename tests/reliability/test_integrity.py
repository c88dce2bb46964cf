"""Data integrity: no run may destroy its input, mix rows up, or hang on one row.

Each case is a way to lose data, misattribute a record or hang that a hostile user found; each
test runs the real CLI and checks the facts (input intact, every id exactly once, records that
belong to their rows, the exit code). ``INTEGRITY`` below is also what ``report.py`` prints as
the integrity table of RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sglrun.batch.readers import row_digest

from .faulty_server import Faults, FaultyServer
from .helpers import check_each_id_once, clean_env, read_records, run_cli, sglrun_command

FAKE = ["--backend", "fake"]

# The row's own text is a variable: a record that belongs to another row shows at once.
ECHO = """\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    with s.var_scope("echo"):
        s += text
    s += " -> " + sgl.gen("reply", max_tokens=4)
"""


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows_of(count: int, start: int = 0, ids: bool = True) -> list[dict]:
    return [
        ({"id": f"r{i}", "text": f"row {i}"} if ids else {"text": f"row {i}"})
        for i in range(start, start + count)
    ]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "prog.py").write_text(ECHO)
    return tmp_path


def batch(work: Path, *args: str, env: dict | None = None, timeout: float = 120):
    return run_cli(
        ["batch", "prog.py", *args, *FAKE], cwd=work, env=env or clean_env(), timeout=timeout
    )


def fact(
    case: str, expected: list[str] | int, records: list[dict], code: int, note: str = ""
) -> None:
    """One row of RELIABILITY.md's integrity table, kept when ``INTEGRITY_FACTS`` names a file
    (``report.py integrity`` runs this file that way): rows, lost, duplicated, error records."""
    path = os.environ.get("INTEGRITY_FACTS")
    if not path:
        return
    ids = [str(i) for i in range(expected)] if isinstance(expected, int) else expected
    seen = [str(r["id"]) for r in records]
    entry = {
        "case": case,
        "rows": len(ids),
        "lost": len(set(ids) - set(seen)),
        "duplicated": len(seen) - len(set(seen)),
        "errors": sum(1 for r in records if r["error"]),
        "exit": code,
        "note": note,
    }
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def belongs(records: list[dict], rows: list[dict], id_field: bool = True) -> None:
    """Every record is its row's: the echoed text and the digest match the input row."""
    by_id = {(row["id"] if id_field else str(index)): row for index, row in enumerate(rows)}
    for record in records:
        row = by_id[record["id"]]
        assert record["digest"] == row_digest(row), record
        if record["error"] is None:
            assert record["vars"]["echo"] == row["text"], record


# ----------------------------------------------------------------------------- 1: links


@pytest.mark.parametrize("link", ["symlink", "hardlink", "linked directory"])
def test_an_output_that_reaches_the_input_through_a_link_is_refused(work, link):
    rows = write(work / "in.jsonl", rows_of(200))
    before = rows.read_bytes()
    if link == "symlink":
        (work / "out.jsonl").symlink_to(rows)
        target = "out.jsonl"
    elif link == "hardlink":
        os.link(rows, work / "out.jsonl")
        target = "out.jsonl"
    else:
        (work / "alias").symlink_to(work, target_is_directory=True)
        target = "alias/in.jsonl"
    for extra in ([], ["--resume", "--id-field", "id"], ["--overwrite"]):
        run = batch(work, "in.jsonl", "-o", target, *extra)
        assert run.returncode == 2, run.describe()
        assert "would overwrite the input" in run.stderr
        assert rows.read_bytes() == before
    fact(
        f"1. -o reaches the input through a {link} (also with --resume, --overwrite)",
        0,
        [],
        run.returncode,
        "refused before opening anything; the 200-row input intact",
    )


def test_an_output_that_is_the_program_is_refused(work):
    write(work / "in.jsonl", rows_of(3))
    source = (work / "prog.py").read_text()
    run = batch(work, "in.jsonl", "-o", "prog.py", "--overwrite")
    assert run.returncode == 2 and "would overwrite the program" in run.stderr
    assert (work / "prog.py").read_text() == source


# ------------------------------------------------------------------- 2 and 5: the wrong input


def test_resume_after_rows_were_inserted_refuses_then_force_redoes_exactly_the_changed_rows(work):
    rows = rows_of(100, ids=False)
    write(work / "in.jsonl", rows)
    assert batch(work, "in.jsonl", "-o", "out.jsonl", "--limit", "60").returncode == 0
    edited = rows[:30] + [{"text": "new A"}, {"text": "new B"}] + rows[30:]
    write(work / "in.jsonl", edited)
    kept = (work / "out.jsonl").read_bytes()
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume")
    assert run.returncode == 2, run.describe()
    assert "changed since their records were written" in run.stderr
    assert (work / "out.jsonl").read_bytes() == kept  # refused: nothing touched
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume", "--force")
    assert run.returncode == 0, run.describe()
    records = read_records(work / "out.jsonl")
    check_each_id_once(records, [str(i) for i in range(len(edited))])
    belongs(records, edited, id_field=False)
    assert "30 skipped (already done)" in run.stderr  # the rows before the insertion
    fact(
        "2. --resume after 2 rows were inserted mid-input (row-number ids)",
        len(edited),
        records,
        run.returncode,
        "refused (exit 2); --force reran the 30 changed rows",
    )


def test_resume_after_rows_were_reordered_is_refused(work):
    rows = rows_of(50, ids=False)
    write(work / "in.jsonl", rows)
    assert batch(work, "in.jsonl", "-o", "out.jsonl", "--limit", "20").returncode == 0
    write(work / "in.jsonl", list(reversed(rows)))
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume")
    assert run.returncode == 2 and "reordered" in run.stderr


def test_resume_into_a_file_sglrun_did_not_write_is_refused(work):
    write(work / "in.jsonl", rows_of(20))
    (work / "copy.jsonl").write_bytes((work / "in.jsonl").read_bytes())
    run = batch(work, "in.jsonl", "-o", "copy.jsonl", "--resume", "--id-field", "id")
    assert run.returncode == 2, run.describe()
    assert "not written by sglrun batch" in run.stderr
    fact("5. --resume -o a copy of the input", 0, [], run.returncode, "refused; nothing run")


def test_resume_with_another_id_scheme_or_program_is_refused(work):
    write(work / "in.jsonl", rows_of(10))
    assert batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id").returncode == 0
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume")
    assert run.returncode == 2 and "--id-field id" in run.stderr
    (work / "prog.py").write_text(ECHO.replace("-> ", "=> "))
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume", "--id-field", "id")
    assert run.returncode == 2 and "another version of the program" in run.stderr
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--resume", "--id-field", "id", "--force")
    assert run.returncode == 0, run.describe()


def test_an_existing_output_is_replaced_only_when_asked_and_only_once_done(work):
    write(work / "in.jsonl", rows_of(30))
    assert batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id").returncode == 0
    before = (work / "out.jsonl").read_bytes()
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id")
    assert run.returncode == 2 and "already holds 30 records" in run.stderr
    assert (work / "out.jsonl").read_bytes() == before
    # --overwrite with a slow backend, killed half-way: the old output is still whole.
    env = clean_env(SGLRUN_FAKE_DELAY="0.05")
    proc = subprocess.Popen(
        [
            *sglrun_command(),
            "batch",
            "prog.py",
            "in.jsonl",
            "-o",
            "out.jsonl",
            "--id-field",
            "id",
            "--overwrite",
            "--num-threads",
            "1",
            *FAKE,
        ],
        cwd=work,
        env=env,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    proc.kill()
    proc.wait(30)
    assert (work / "out.jsonl").read_bytes() == before
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id", "--overwrite")
    assert run.returncode == 0
    check_each_id_once(read_records(work / "out.jsonl"), [f"r{i}" for i in range(30)])


# ----------------------------------------------------------------------------- 3: ids


def test_duplicate_and_colliding_ids_get_error_records_of_their_own(work):
    rows = [
        {"id": "a", "text": "first a"},
        {"id": "b", "text": "b"},
        {"id": "a", "text": "second a"},  # a repeat: an error record of its own
        {"id": 123456789012345678901234567890, "text": "big"},
        {"id": 123456789012345678901234567891, "text": "big too"},
        {"id": 1, "text": "number one"},
        {"id": "1", "text": "string one"},  # the same id as written: a repeat
        {"text": "no id"},  # line 8: falls back to line-8
        {"id": "line-8", "text": "declares line-8"},  # would collide: a repeat
    ]
    write(work / "in.jsonl", rows)
    run = batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id")
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(rows)  # one record per row, no id shared
    assert "123456789012345678901234567890" in ids and "123456789012345678901234567891" in ids
    by_id = {r["id"]: r for r in records}
    assert by_id["a"]["vars"]["echo"] == "first a"
    assert by_id["a@line-3"]["error"]["message"].endswith("(first at line 1)")
    assert by_id["1@line-7"]["error"] is not None and by_id["line-8"]["vars"]["echo"] == "no id"
    assert by_id["line-8@line-9"]["error"] is not None
    again = batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id", "--resume")
    assert "9 skipped" in again.stderr and again.returncode == 1  # nothing ran twice
    assert read_records(work / "out.jsonl") == records
    fact(
        '3. duplicate, 1/"1", 2^64+ and fallback-colliding --id-field values',
        ids,
        records,
        run.returncode,
        "each repeat is an error record with an id of its own",
    )


def test_a_big_integer_argument_reaches_the_program_exactly(work):
    (work / "int.py").write_text(
        "import sglrun as sgl\n\n@sgl.function\ndef f(s, n: int):\n    s['n'] = str(n)\n"
        "    s += sgl.gen('x', max_tokens=1)\n"
    )
    write(work / "in.jsonl", [{"n": 123456789012345678901234567890}])
    run = run_cli(["batch", "int.py", "in.jsonl", "-o", "-", *FAKE], cwd=work, env=clean_env())
    record = json.loads(run.stdout)
    assert record["vars"]["n"] == "123456789012345678901234567890"
    fact("10. an int argument beyond 64 bits", 1, [record], run.returncode, "exact digits")


# ----------------------------------------------------------------------------- 4: two writers


def test_a_second_writer_of_the_same_output_fails_at_once(work):
    write(work / "in.jsonl", rows_of(40))
    env = clean_env(SGLRUN_FAKE_DELAY="0.25")  # about 5 s in all: the others come meanwhile
    command = [
        *sglrun_command(),
        "batch",
        "prog.py",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "--id-field",
        "id",
        "--num-threads",
        "2",
        *FAKE,
    ]
    first = subprocess.Popen(command, cwd=work, env=env, stderr=subprocess.PIPE)
    time.sleep(0.8)
    for extra in ([], ["--resume"]):
        second = run_cli(
            ["batch", "prog.py", "in.jsonl", "-o", "out.jsonl", "--id-field", "id", *extra, *FAKE],
            cwd=work,
            env=clean_env(),
            timeout=30,
        )
        assert second.returncode == 2, second.describe()
        assert f"another sglrun (pid {first.pid})" in second.stderr
    assert first.wait(60) == 0
    records = read_records(work / "out.jsonl")
    check_each_id_once(records, [f"r{i}" for i in range(40)])
    fact(
        "4. a second process on the same output (with and without --resume)",
        [f"r{i}" for i in range(40)],
        records,
        0,
        "the second fails at once naming the pid",
    )


# ----------------------------------------------------------------------------- 6: secrets


def test_credentials_in_a_url_are_sent_as_basic_auth_and_never_shown(work):
    password = "S3cr3t-Pa55word"
    write(work / "in.jsonl", rows_of(20))
    with FaultyServer(Faults(error_rate=1.0), seed=3, max_lifetime=60) as server:
        url = server.url.replace("://", f"://alice:{password}@")
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--backend",
                "sglang",
                "--url",
                url,
                "--id-field",
                "id",
                "-v",
            ],
            cwd=work,
            env=clean_env(SGLRUN_RETRIES="0"),
            timeout=60,
        )
        sent = [h.get("Authorization", "") for h in server.headers_seen]
    assert sent and all(value.startswith("Basic ") for value in sent)
    shown = run_cli(["config", "show", "--json"], cwd=work, env=clean_env(SGLRUN_URL=url))
    assert run.returncode == 1
    for text in (run.stdout, run.stderr, (work / "out.jsonl").read_text(), shown.stdout):
        assert password not in text
    assert "***@" in shown.stdout
    fact(
        "6. credentials in --url (every request fails)",
        [f"r{i}" for i in range(20)],
        read_records(work / "out.jsonl"),
        run.returncode,
        "sent as basic auth; password in no record, log or config show",
    )


# ----------------------------------------------------------------------------- 7: a looping row


LOOPS = """\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    if text == "row 3":
        while True:
            pass
    s += text + sgl.gen("reply", max_tokens=4)
"""


def test_a_row_that_loops_forever_times_out_and_the_batch_goes_on(work):
    (work / "loop.py").write_text(LOOPS)
    write(work / "in.jsonl", rows_of(12))
    args = [
        "batch",
        "loop.py",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "--id-field",
        "id",
        "--row-timeout",
        "1",
        *FAKE,
    ]
    run = run_cli(args, cwd=work, env=clean_env(), timeout=60)
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    check_each_id_once(records, [f"r{i}" for i in range(12)])
    assert [r["id"] for r in records if r["error"]] == ["r3"]
    assert records[3]["error"]["type"] == "RowTimeout"
    again = run_cli([*args, "--resume"], cwd=work, env=clean_env(), timeout=30)
    assert again.returncode == 1 and "12 skipped" in again.stderr  # no freeze on the row
    fact(
        "7. one row loops forever (--row-timeout 1)",
        [f"r{i}" for i in range(12)],
        records,
        run.returncode,
        "RowTimeout record; a resume skips it",
    )


# ----------------------------------------------------------------------------- 8: print()


PRINTS = """\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    print("working on", text)
    s += text + sgl.gen("reply", max_tokens=4)
"""


def test_a_program_that_prints_never_corrupts_records_on_stdout(work):
    (work / "prints.py").write_text(PRINTS)
    write(work / "in.jsonl", rows_of(50))
    run = run_cli(
        ["batch", "prints.py", "in.jsonl", "-o", "-", "--id-field", "id", *FAKE],
        cwd=work,
        env=clean_env(),
    )
    lines = run.stdout.splitlines()
    assert len(lines) == 50 and all(json.loads(line)["error"] is None for line in lines)
    assert run.stderr.count("working on") == 50
    captured = run_cli(
        [
            "batch",
            "prints.py",
            "in.jsonl",
            "-o",
            "-",
            "--id-field",
            "id",
            "--include",
            "stdout",
            *FAKE,
        ],
        cwd=work,
        env=clean_env(),
    )
    records = [json.loads(line) for line in captured.stdout.splitlines()]
    assert [r["stdout"] for r in records] == [f"working on row {i}\n" for i in range(50)]
    assert "working on" not in captured.stderr
    fact(
        "8. the program print()s, -o -",
        [f"r{i}" for i in range(50)],
        records,
        run.returncode,
        "every stdout line is a record; prints on stderr (or in the record)",
    )


# ----------------------------------------------------------------------------- 9: HTTP limits


class _Silly:
    """A server on 127.0.0.1 that answers the start-up probe, then misbehaves on /generate:
    ``drip`` a byte every half second, ``endless`` body, or ``silent`` from the start."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                if self.mode == "silent":
                    self.stop.wait(60)
                    return
                if b"/get_model_info" in head.split(b"\r\n", 1)[0]:
                    body = b'{"model_path": "silly"}'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    continue
                if self.mode == "drip":  # a small declared body that never completes
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100000\r\n\r\n{"
                    )
                else:  # no length: a body that goes on until the connection closes
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\n\r\n{"
                    )
                while not self.stop.is_set():
                    if self.mode == "drip":
                        conn.sendall(b" ")
                        time.sleep(0.5)
                    else:
                        conn.sendall(b" " * 1_000_000)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["drip", "endless"])
def test_a_server_that_never_finishes_an_answer_costs_one_deadline(work, mode):
    server = _Silly(mode)
    write(work / "in.jsonl", rows_of(3))
    try:
        started = time.monotonic()
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--backend",
                "sglang",
                "--url",
                server.url,
                "--id-field",
                "id",
            ],
            cwd=work,
            env=clean_env(SGLRUN_TIMEOUT="2", SGLRUN_RETRIES="0"),
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        server.close()
    assert run.returncode == 1, run.describe()
    records = read_records(work / "out.jsonl")
    assert all(r["error"]["type"] == "TransportError" for r in records)
    assert took < 15  # one 2 s deadline per request, whatever the server keeps sending
    if mode == "endless":
        assert "larger than" in records[0]["error"]["message"]
    fact(
        f"9. a server that {'drips a byte every 0.5 s' if mode == 'drip' else 'sends forever'}"
        " (timeout 2)",
        [f"r{i}" for i in range(3)],
        records,
        run.returncode,
        f"{took:.1f} s",
    )


def test_a_server_silent_at_start_up_fails_within_the_connect_timeout(work):
    server = _Silly("silent")
    write(work / "in.jsonl", rows_of(2))
    try:
        started = time.monotonic()
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--backend",
                "sglang",
                "--url",
                server.url,
            ],
            cwd=work,
            env=clean_env(SGLRUN_TIMEOUT="3", SGLRUN_RETRIES="0"),
            timeout=60,
        )
        took = time.monotonic() - started
    finally:
        server.close()
    assert run.returncode == 2, run.describe()
    assert len(run.stderr.strip().splitlines()) == 1 and "no" in run.stderr
    assert took < 10


def test_a_timed_out_list_is_not_sent_again_row_by_row(work):
    write(work / "in.jsonl", rows_of(40))
    faults = Faults(hang_rate=1.0, hang_seconds=30)
    with FaultyServer(faults, seed=2, max_lifetime=60) as server:
        started = time.monotonic()
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--backend",
                "sglang",
                "--url",
                server.url,
                "--id-field",
                "id",
                "--num-threads",
                "40",
            ],
            cwd=work,
            env=clean_env(SGLRUN_TIMEOUT="2", SGLRUN_RETRIES="0"),
            timeout=60,
        )
        took = time.monotonic() - started
    assert run.returncode == 1
    records = read_records(work / "out.jsonl")
    assert all(r["error"]["type"] == "TransportError" for r in records)
    assert took < 9  # the lists' 2 s deadline, not that plus 2 s more per row alone
    fact(
        "9. a hung server, coalesced lists (timeout 2)",
        [f"r{i}" for i in range(40)],
        records,
        run.returncode,
        f"{took:.1f} s: one deadline, lists not resent",
    )


# ----------------------------------------------------------------------------- 11: SIGHUP


def test_sighup_stops_like_sigterm_and_the_resume_finishes(work):
    write(work / "in.jsonl", rows_of(60))
    proc = subprocess.Popen(
        [
            *sglrun_command(),
            "batch",
            "prog.py",
            "in.jsonl",
            "-o",
            "out.jsonl",
            "--id-field",
            "id",
            "--num-threads",
            "2",
            *FAKE,
        ],
        cwd=work,
        env=clean_env(SGLRUN_FAKE_DELAY="0.05"),
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "interrupted after" in stderr
    done = batch(work, "in.jsonl", "-o", "out.jsonl", "--id-field", "id", "--resume")
    assert done.returncode == 0
    records = read_records(work / "out.jsonl")
    check_each_id_once(records, [f"r{i}" for i in range(60)])
    fact(
        "11. SIGHUP mid-run, then --resume",
        [f"r{i}" for i in range(60)],
        records,
        proc.returncode,
        "summary and resume command printed; exit 130",
    )


# ------------------------------------------------------------------ 12 and the smaller ones


def test_a_csv_with_a_hundred_thousand_columns_reads_in_linear_time(work):
    columns = ["text"] + [f"c{i}" for i in range(100_000)]
    (work / "wide.csv").write_text(",".join(columns) + "\n" + ",".join(["hi"] * len(columns)))
    run = batch(work, "wide.csv", "-o", "out.jsonl", timeout=40)  # quadratic: minutes
    assert run.returncode == 0, run.describe()
    fact(
        "12. a CSV with 100,000 columns",
        1,
        read_records(work / "out.jsonl"),
        run.returncode,
        f"{run.seconds:.1f} s",
    )


def test_an_unterminated_csv_quote_is_an_error_naming_what_it_swallowed(work):
    (work / "in.csv").write_text('text\nfine\n"broken\nlost 1\nlost 2\n')
    run = batch(work, "in.csv", "-o", "out.jsonl")
    assert run.returncode == 1
    records = read_records(work / "out.jsonl")
    assert records[0]["error"] is None
    assert (
        "never closed" in records[1]["error"]["message"]
        and "3 lines" in records[1]["error"]["message"]
    )


def test_a_json_array_is_one_clear_error(work):
    (work / "in.json").write_text(json.dumps(rows_of(3), indent=2))
    run = batch(work, "in.json", "-o", "out.jsonl")
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "jq -c" in run.stderr


def test_a_lone_surrogate_still_gives_valid_utf8(work):
    (work / "in.jsonl").write_text('{"text": "bad \\ud800 char"}\n')
    run = batch(work, "in.jsonl", "-o", "out.jsonl")
    data = (work / "out.jsonl").read_bytes()
    data.decode("utf-8")  # strict: raises on an invalid line
    assert run.returncode in (0, 1) and len(read_records(work / "out.jsonl")) == 1


def test_an_input_truncated_while_it_is_read_is_reported(work):
    write(work / "in.jsonl", rows_of(400))
    proc = subprocess.Popen(
        [
            *sglrun_command(),
            "batch",
            "prog.py",
            "in.jsonl",
            "-o",
            "out.jsonl",
            "--id-field",
            "id",
            "--num-threads",
            "2",
            *FAKE,
        ],
        cwd=work,
        env=clean_env(SGLRUN_FAKE_DELAY="0.02"),
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    os.truncate(work / "in.jsonl", 2000)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "shrank" in stderr


def test_a_retry_after_of_zero_still_backs_off_and_a_long_one_says_why(work):
    write(work / "in.jsonl", rows_of(1))
    with FaultyServer(
        Faults(rate_limit_rate=1.0, retry_after=0), seed=1, max_lifetime=60
    ) as server:
        started = time.monotonic()
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out.jsonl",
                "--backend",
                "sglang",
                "--url",
                server.url,
                "--id-field",
                "id",
            ],
            cwd=work,
            env=clean_env(SGLRUN_RETRIES="3"),
            timeout=60,
        )
        took = time.monotonic() - started
    assert run.returncode == 1 and took > 0.8  # three backoffs of at least 0.25, 0.5, 1 s / 2
    with FaultyServer(
        Faults(rate_limit_rate=1.0, retry_after=3600), seed=1, max_lifetime=60
    ) as server:
        run = run_cli(
            [
                "batch",
                "prog.py",
                "in.jsonl",
                "-o",
                "out2.jsonl",
                "--backend",
                "sglang",
                "--url",
                server.url,
                "--id-field",
                "id",
            ],
            cwd=work,
            env=clean_env(),
            timeout=60,
        )
    message = read_records(work / "out2.jsonl")[0]["error"]["message"]
    assert "asked to wait 3600 s" in message and "retry budget" in message


# ----------------------------------------------------------------------------- the property

SEEDS = [int(seed) for seed in os.environ.get("INTEGRITY_SEEDS", "11,12").split(",")]


def _edit(rng, rows: list[dict], ids: bool, counter: list[int]) -> list[dict]:
    """One random edit of the input: rows changed, inserted, deleted or reordered."""
    rows = [dict(row) for row in rows]
    kind = rng.choice(["change", "insert", "delete", "reorder"])
    if kind == "change":
        for index in rng.sample(range(len(rows)), k=min(5, len(rows))):
            rows[index]["text"] += " (edited)"
    elif kind == "insert":
        at = rng.randrange(len(rows) + 1)
        counter[0] += 1
        new = [{"text": f"new {counter[0]}.{k}"} for k in range(3)]
        if ids:
            for k, row in enumerate(new):
                row["id"] = f"n{counter[0]}.{k}"
        rows[at:at] = new
    elif kind == "delete" and len(rows) > 10:
        at = rng.randrange(len(rows) - 3)
        del rows[at : at + 3]
    else:
        at = rng.randrange(max(1, len(rows) - 20))
        rows[at : at + 20] = list(reversed(rows[at : at + 20]))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kills_edits_and_resumes_never_lose_or_mix_up_a_row(work, seed):
    """Random interleavings of killed runs, input edits and resumes over 500 rows: a resume
    either refuses (one line, output untouched) or leaves every record its row's; the end is
    every row exactly once, each record belonging to its row."""
    import random

    rng = random.Random(seed)
    ids = seed % 2 == 0  # content ids (--id-field) on even seeds, row numbers on odd ones
    id_args = ["--id-field", "id"] if ids else []
    rows = rows_of(500, ids=ids)
    write(work / "in.jsonl", rows)
    counter = [0]
    env = clean_env(SGLRUN_FAKE_DELAY="0.03")  # a whole run takes about 2 s
    hits = 0
    command = [
        *sglrun_command(),
        "batch",
        "prog.py",
        "in.jsonl",
        "-o",
        "out.jsonl",
        *id_args,
        "--num-threads",
        "8",
        *FAKE,
    ]
    for _ in range(10):
        action = rng.choice(["kill", "kill", "edit", "resume"])
        started = (work / "out.jsonl").exists()
        if action == "kill":
            proc = subprocess.Popen(
                [*command, *(["--resume"] if started else [])],
                cwd=work,
                env=env,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.4, 1.6))
            hits += proc.poll() is None
            proc.send_signal(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            proc.wait(30)
        elif action == "edit":
            rows = _edit(rng, rows, ids, counter)
            write(work / "in.jsonl", rows)
        elif started:
            before = (work / "out.jsonl").read_bytes()
            run = batch(work, "in.jsonl", "-o", "out.jsonl", *id_args, "--resume", env=env)
            if run.returncode == 2:  # refused: one line, and nothing touched
                assert len(run.stderr.strip().splitlines()) == 1, run.describe()
                assert (work / "out.jsonl").read_bytes() == before
            else:
                assert run.returncode == 0, run.describe()
                belongs(read_records(work / "out.jsonl"), rows, id_field=ids)
    assert hits, "no kill hit a running batch: the test proves little"
    resume = ["--resume", "--force"] if (work / "out.jsonl").exists() else []
    final = batch(work, "in.jsonl", "-o", "out.jsonl", *id_args, *resume, env=env, timeout=180)
    assert final.returncode == 0, final.describe()
    records = read_records(work / "out.jsonl")
    expected = [row["id"] for row in rows] if ids else [str(i) for i in range(len(rows))]
    check_each_id_once(records, expected)
    belongs(records, rows, id_field=ids)
    fact(
        f"random kills, edits and resumes (seed {seed}, {'content ids' if ids else 'row numbers'})",
        expected,
        records,
        final.returncode,
        f"{hits} kills mid-run",
    )


def test_a_closed_stdout_is_a_clear_error(work):
    write(work / "in.jsonl", rows_of(2))
    done = subprocess.run(
        [*sglrun_command(), "batch", "prog.py", "in.jsonl", "-o", "-", *FAKE],
        cwd=work,
        env=clean_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),
        timeout=60,
    )
    assert done.returncode == 2 and "stdout is closed" in done.stderr
    assert "internal error" not in done.stderr
