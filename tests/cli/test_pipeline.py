"""The real ``sglrun`` process: pipes, signals, resume after SIGKILL, terminals, start-up.

Mostly on the fake backend; the two ``model`` tests run the embedded SmolLM2 engine.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, SGLRUN, clean_env, read_jsonl, write_jsonl, write_program

ANSI = re.compile(rb"\x1b\[")
FAKE = ["--backend", "fake"]


def sglrun(*args: str, tmp_path: Path, input: bytes | None = None, timeout: float = 60, **env):
    return subprocess.run(
        [SGLRUN, *args],
        input=input,
        capture_output=True,
        cwd=tmp_path,
        env=clean_env(tmp_path, **env),
        timeout=timeout,
    )


def wait_for_lines(path: Path, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines")


def ids_of(path: Path) -> list[str]:
    return [record["id"] for record in read_jsonl(path)]


# ----------------------------------------------------------------------------- pipes


def test_stdin_to_stdout_pipeline(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}"} for i in range(25)])
    count = f"{sys.executable} -c 'import sys; print(sum(1 for _ in sys.stdin))'"
    shell = f"cat rows.jsonl | {SGLRUN} batch {program} - -o - --backend fake | {count}"
    result = subprocess.run(
        shell, shell=True, capture_output=True, cwd=tmp_path, env=clean_env(tmp_path), timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == b"25"


def test_python_dash_m_runs_the_same_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sglrun", "--help"],
        capture_output=True,
        env=clean_env(tmp_path),
        timeout=60,
    )
    assert result.returncode == 0
    assert b"batch" in result.stdout and b"inspect" in result.stdout


def test_closed_stdout_pipe_stops_quietly(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q"}] * 3000)
    shell = f"{SGLRUN} batch {program} rows.jsonl -o - --backend fake -q | head -n 2"
    result = subprocess.run(
        shell, shell=True, capture_output=True, cwd=tmp_path, env=clean_env(tmp_path), timeout=60
    )
    assert len(result.stdout.splitlines()) == 2
    assert b"Traceback" not in result.stderr


# ----------------------------------------------------------------------------- exit codes


def test_exit_0_and_plain_stderr_when_not_a_terminal(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}"} for i in range(10)])
    result = sglrun("batch", str(program), "rows.jsonl", *FAKE, "--stream", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert not ANSI.search(result.stderr)
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"sglrun: 10 rows, 10 ok, 0 failed, [\d.]+ rows/s, [\d.]+ tok/s, "
        r"tokens 30 in / 20 out, \d+ ms/row, [\d.]+ s -> rows\.out\.jsonl",
        lines[0],
    )


def test_max_failures_stops_taking_rows_and_keeps_those_done(tmp_path):
    program = write_program(tmp_path)
    rows = [{"question": "boom" if i % 2 else f"q{i}"} for i in range(200)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    result = sglrun(
        "batch", str(program), "rows.jsonl", *FAKE, "--max-failures", "3", "--concurrency", "1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "stopped taking rows at 3 failed rows (--max-failures 3)" in result.stderr.decode()
    records = read_jsonl(tmp_path / "rows.out.jsonl")
    assert 6 <= len(records) < 20  # stopped early; every record written is whole
    assert sum(r["error"] is not None for r in records) >= 3
    again = sglrun("batch", str(program), "rows.jsonl", *FAKE, "--max-failures", "0",
                   tmp_path=tmp_path)  # fmt: skip
    assert again.returncode == 2 and b"--max-failures must be >= 1" in again.stderr


def test_exit_1_when_rows_fail(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "ok"}, {"question": "boom"}])
    result = sglrun("batch", str(program), "rows.jsonl", *FAKE, tmp_path=tmp_path)
    assert result.returncode == 1
    assert b"2 rows, 1 ok, 1 failed" in result.stderr
    assert not ANSI.search(result.stderr)


def test_exit_2_with_one_line_for_a_missing_program(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q"}])
    result = sglrun("batch", "nothere.py", "rows.jsonl", *FAKE, tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "sglrun: error: nothere.py: no such program file"


def test_sigint_exits_130_with_whole_records_and_a_resume_hint(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}"} for i in range(200)])
    out = tmp_path / "out.jsonl"
    args = ["batch", str(program), "rows.jsonl", "-o", "out.jsonl", *FAKE, "--num-threads", "2"]
    process = subprocess.Popen(
        [SGLRUN, *args],
        cwd=tmp_path,
        env=clean_env(tmp_path, SGLRUN_FAKE_DELAY="0.05"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_lines(out, 3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    text = stderr.decode()
    assert "interrupted" in text and "--resume" in text
    assert "sglrun batch" in text
    done = ids_of(out)  # every line parses: only whole records
    assert 3 <= len(done) < 200
    assert done == [str(i) for i in range(len(done))]

    result = sglrun(*args, "--resume", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(ids_of(out), key=int) == [str(i) for i in range(200)]


def test_resume_after_sigkill_runs_every_id_exactly_once(tmp_path):
    program = write_program(tmp_path)
    rows = [{"id": f"row-{i:03d}", "question": f"q{i}"} for i in range(120)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["batch", str(program), "rows.jsonl", "-o", "out.jsonl", "--id-field", "id", *FAKE]
    process = subprocess.Popen(
        [SGLRUN, *args, "--num-threads", "4", "--unordered"],
        cwd=tmp_path,
        env=clean_env(tmp_path, SGLRUN_FAKE_DELAY="0.03"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_lines(out, 10)
    process.kill()
    process.wait(timeout=30)
    before = ids_of_lenient(out)
    assert 10 <= len(before) < 120
    with out.open("ab") as handle:  # as if the kill tore the last write
        handle.write(b'{"id": "row-1')

    result = sglrun(*args, "--resume", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert b"repaired" in result.stderr
    after = ids_of(out)
    assert len(after) == 120
    assert sorted(after) == sorted(row["id"] for row in rows)
    assert b"skipped" in result.stderr


def ids_of_lenient(path: Path) -> list[str]:
    ids = []
    for line in path.read_bytes().splitlines():
        try:
            ids.append(json.loads(line)["id"])
        except ValueError:
            pass
    return ids


# ----------------------------------------------------------------------------- terminal


def run_in_pty(args: list[str], tmp_path: Path, **env: str) -> tuple[int, bytes]:
    """Run with stderr on a pseudo-terminal (stdout to /dev/null); returns (code, stderr)."""
    import pty

    master, slave = pty.openpty()
    process = subprocess.Popen(
        [SGLRUN, *args],
        cwd=tmp_path,
        env=clean_env(tmp_path, **{"TERM": "xterm-256color", **env}),
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks)


@pytest.mark.parametrize("extra", [[], ["--stream"]])
def test_terminal_gets_a_live_display(tmp_path, extra):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}"} for i in range(30)])
    code, stderr = run_in_pty(
        ["batch", str(program), "rows.jsonl", *FAKE, "--num-threads", "4", *extra],
        tmp_path,
        SGLRUN_FAKE_DELAY="0.03",
    )
    assert code == 0
    assert ANSI.search(stderr)
    assert b"30/30" in stderr
    assert b"sglrun: 30 rows, 30 ok, 0 failed" in stderr
    assert len(read_jsonl(tmp_path / "rows.out.jsonl")) == 30


def test_quiet_and_dumb_terminals_get_no_escape_codes(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q"}] * 5)
    args = ["batch", str(program), "rows.jsonl", "--overwrite", *FAKE]
    for extra, env in ((["-q"], {}), ([], {"TERM": "dumb"})):
        code, stderr = run_in_pty(args + extra, tmp_path, **env)
        assert code == 0
        assert not ANSI.search(stderr), stderr
        assert stderr.strip().startswith(b"sglrun: 5 rows, 5 ok")


def test_no_color_turns_colour_off(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "q"}] * 5)
    code, stderr = run_in_pty(["batch", str(program), "rows.jsonl", *FAKE], tmp_path, NO_COLOR="1")
    assert code == 0
    assert not re.search(rb"\x1b\[[0-9;]*3[0-9]m|\x1b\[[0-9;]*9[0-7]m|38;5;", stderr)


# ----------------------------------------------------------------------------- start-up


def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['sglrun', '--help']\n"
        "try:\n"
        "    runpy.run_module('sglrun', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('rich', 'orjson', 'xllamacpp', 'yaml', 'urllib3', 'sglrun.backends.llamacpp')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy),"
        " file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=clean_env(tmp_path), timeout=60
    )
    assert result.stderr.decode().strip().splitlines()[-1] == "[]"

    best = float("inf")
    for _ in range(3):  # CPU time, not wall time: stable on a busy machine
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([SGLRUN, "--help"], capture_output=True, env=clean_env(tmp_path), timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        best = min(best, used)
    assert best <= 0.3, f"sglrun --help used {best:.2f} s of CPU"


# ----------------------------------------------------------------------------- real model

SUMMARIZE = str(ROOT / "programs" / "summarize.py")


@pytest.mark.model
@pytest.mark.slow
def test_run_on_the_embedded_model(tmp_path):
    text = "The bakery opens at six. Early commuters wanted fresh bread before work."
    result = sglrun(
        "run", SUMMARIZE, "--max-new-tokens", "8", "--temperature", "0", "-v",
        "--engine-threads", "1", "--slots", "2", "--ctx-size", "1024", "--",
        "--text", text, tmp_path=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    variables = json.loads(result.stdout)  # not a terminal: the JSON alone (`| jq`)
    assert isinstance(variables["summary"], str) and variables["summary"].strip()
    log = result.stderr.decode()
    assert "SmolLM2-135M-Instruct" in log and ".gguf" in log
    assert "1 threads, 2 slots, context 1024 tokens (512 per slot)" in log


@pytest.mark.model
@pytest.mark.slow
def test_batch_on_the_embedded_model(tmp_path):
    sample = (ROOT / "sample_data" / "summarize.jsonl").read_text().splitlines()[:2]
    (tmp_path / "rows.jsonl").write_text("\n".join(sample) + "\n")
    result = sglrun(
        "batch", SUMMARIZE, "rows.jsonl", "-o", "out.jsonl", "--id-field", "id",
        "--max-new-tokens", "8", "--include", "meta", tmp_path=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [json.loads(line)["id"] for line in sample]
    for record in records:
        assert record["error"] is None
        assert record["vars"]["summary"].strip()
        assert record["meta"]["summary"]["completion_tokens"] > 0
    assert b"2 rows, 2 ok, 0 failed" in result.stderr


def test_joblog_has_a_line_per_row_and_counts_attempts(tmp_path):
    program = write_program(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", [{"question": "ok"}, {"question": "boom"}])
    first = sglrun("batch", str(program), "rows.jsonl", *FAKE, "--joblog", "jobs.tsv",
                   tmp_path=tmp_path)  # fmt: skip
    assert first.returncode == 1
    again = sglrun("batch", str(program), "rows.jsonl", *FAKE, "--joblog", "jobs.tsv",
                   "--retry-errors", tmp_path=tmp_path)  # fmt: skip
    assert again.returncode == 1  # "boom" fails again
    lines = [line.split("\t") for line in (tmp_path / "jobs.tsv").read_text().splitlines()]
    assert lines[0] == ["id", "start", "runtime", "status", "attempts"]
    rows = lines[1:]
    assert sorted((r[0], r[3], r[4]) for r in rows) == [
        ("0", "ok", "1"), ("1", "failed", "1"), ("1", "failed", "2"),
    ]  # fmt: skip
    for row in rows:
        assert abs(float(row[1]) - time.time()) < 600 and float(row[2]) >= 0
    (tmp_path / "other.tsv").write_text("not a log\n")
    bad = sglrun("batch", str(program), "rows.jsonl", *FAKE, "--joblog", "other.tsv",
                 "--overwrite", tmp_path=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and b"other.tsv: not an sglrun job log" in bad.stderr


def test_gzip_tsv_and_delimiter_inputs(tmp_path):
    import gzip

    program = write_program(tmp_path)
    rows = [{"question": f"q{i}", "times": i + 1} for i in range(3)]
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "rows.tsv").write_text("question\ttimes\nq0\t1\nq,1\t2\n")
    (tmp_path / "rows.txt").write_text("question;times\nq0;1\nq1;2\n")
    with gzip.open(tmp_path / "rows.csv.gz", "wt") as handle:
        handle.write("question,times\nq0,1\nq1,2\n")
    for name, extra in [("rows.jsonl.gz", []), ("rows.tsv", []), ("rows.csv.gz", []),
                        ("rows.txt", ["--format", "csv", "--delimiter", ";"])]:  # fmt: skip
        out = f"{name}.out.jsonl"
        result = sglrun("batch", str(program), name, *FAKE, "-o", out, *extra, tmp_path=tmp_path)
        assert result.returncode == 0, (name, result.stderr)
        records = read_jsonl(tmp_path / out)
        assert [r["error"] for r in records] == [None] * len(records), name
        assert len(records) == (3 if name.startswith("rows.jsonl") else 2), name
    dry = sglrun("batch", str(program), "rows.tsv", *FAKE, "--dry-run", tmp_path=tmp_path)
    prompts = [json.loads(line)["prompt"] for line in dry.stdout.decode().splitlines()]
    assert prompts == ["Q: q0\nA:", "Q: q,1q,1\nA:"]  # a comma is data in TSV


def test_csv_tsv_parquet_and_gzip_outputs_hold_every_row(tmp_path):
    import csv
    import gzip

    program = write_program(tmp_path)
    rows = [{"question": "ok", "times": 1, "note": "a,b"}, {"question": "boom", "note": "x"}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    include = ["--include", "input:note,question"]
    for name in ("out.csv", "out.tsv", "out.parquet", "out.jsonl.gz"):
        result = sglrun("batch", str(program), "rows.jsonl", *FAKE, "-o", name, *include,
                        tmp_path=tmp_path)  # fmt: skip
        assert result.returncode == 1, (name, result.stderr)  # the "boom" row fails
        assert f"-> {name}".encode() in result.stderr
    with open(tmp_path / "out.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["id", "answer", "error", "input.note", "input.question"]
    assert table[1] == ["0", "hello world", "", "a,b", "ok"]
    assert table[2][0] == "1" and table[2][2].startswith("ValueError: the program refused")
    tsv = (tmp_path / "out.tsv").read_text().splitlines()
    assert tsv[1].split("\t") == ["0", "hello world", "", "a,b", "ok"]
    import pyarrow.parquet as pq

    parquet = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in parquet] == ["0", "1"] and parquet[0]["answer"] == "hello world"
    assert parquet[1]["error"].startswith("ValueError") and parquet[1]["input.note"] == "x"
    with gzip.open(tmp_path / "out.jsonl.gz", "rt") as handle:
        records = [json.loads(line) for line in handle]
    assert records[0]["input"] == {"note": "a,b", "question": "ok"}
    # A resume renders old and new rows; an existing output is never replaced unasked.
    again = sglrun("batch", str(program), "rows.jsonl", *FAKE, "-o", "out.csv", *include,
                   tmp_path=tmp_path)  # fmt: skip
    assert again.returncode == 2 and b"--overwrite" in again.stderr
    write_jsonl(tmp_path / "rows.jsonl", [*rows, {"question": "new"}])
    resumed = sglrun("batch", str(program), "rows.jsonl", *FAKE, "-o", "out.csv", *include,
                     "--resume", tmp_path=tmp_path)  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr  # the old failure is kept
    with open(tmp_path / "out.csv", newline="") as handle:
        assert [row[0] for row in csv.reader(handle)] == ["id", "0", "1", "2"]
    (tmp_path / "copy.csv").write_text("x\n")
    os.symlink(tmp_path / "rows.jsonl", tmp_path / "link.csv")
    bad = sglrun("batch", str(program), "rows.jsonl", *FAKE, "-o", "link.csv", "--overwrite",
                 tmp_path=tmp_path)  # fmt: skip
    assert bad.returncode == 2  # the rendered output may not be the input either
    assert (tmp_path / "rows.jsonl").read_text().count("\n") == 3


JSON_PROGRAM = """
import sglrun as sgl


@sgl.function
def person(s, text: str):
    s += text + sgl.gen("person", json_schema={"type": "object"}, max_tokens=40)
    s += sgl.gen("plain", max_tokens=40)
"""


def test_json_values_writes_json_schema_variables_as_objects(tmp_path):
    program = write_program(tmp_path, JSON_PROGRAM)
    write_jsonl(tmp_path / "rows.jsonl", [{"text": "Ann"}])
    replies = json.dumps(['{"name": "Ann", "age": 3}', '{"not": "schema"}'])
    for flag, expected in (([], str), (["--json-values"], dict)):
        result = sglrun(
            "batch", str(program), "rows.jsonl", *FAKE, "-o", "out.jsonl", "--overwrite", *flag,
            tmp_path=tmp_path, SGLRUN_FAKE_REPLIES=replies,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        variables = read_jsonl(tmp_path / "out.jsonl")[0]["vars"]
        assert isinstance(variables["person"], expected)
        assert variables["plain"] == '{"not": "schema"}'  # not a json_schema gen: text
    assert variables["person"] == {"name": "Ann", "age": 3}


@pytest.mark.model
@pytest.mark.slow
def test_reproducible_gives_the_same_greedy_text_in_any_order(tmp_path):
    sample = (ROOT / "sample_data" / "summarize.jsonl").read_text().splitlines()[:5]
    (tmp_path / "rows.jsonl").write_text("\n".join(sample) + "\n")
    (tmp_path / "reversed.jsonl").write_text("\n".join(reversed(sample)) + "\n")
    summaries = []
    for name in ("rows.jsonl", "reversed.jsonl"):
        result = sglrun(
            "batch", SUMMARIZE, name, "-o", f"{name}.out", "--id-field", "id",
            "--reproducible", "--max-new-tokens", "24", tmp_path=tmp_path, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        records = read_jsonl(tmp_path / f"{name}.out")
        summaries.append({r["id"]: r["vars"]["summary"] for r in records})
    assert summaries[0] == summaries[1] and len(summaries[0]) == 5
