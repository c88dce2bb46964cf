"""The sglrun CLI in-process (typer's CliRunner) on the fake backend."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

from sglrun.cli.app import app

from .conftest import ROOT, SGLRUN, clean_env, read_jsonl, write_jsonl, write_program

FAKE = ["--backend", "fake"]


def invoke(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sglrun: error: ")
    return lines[0]


# ----------------------------------------------------------------------------- help


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("batch", "run", "inspect", "config"):
        assert command in result.stdout
    assert "--install-completion" in result.stdout


def test_batch_help_documents_default_output_and_exit_codes():
    result = invoke("batch", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "<input stem>.out.jsonl" in text and "stdout when INPUT is -" in text
    assert "130 interrupted" in text and "--resume" in text


# ----------------------------------------------------------------------------- batch


def test_batch_jsonl_converts_types_and_writes_default_output(isolated):
    program = write_program(isolated)
    write_jsonl(
        isolated / "rows.jsonl",
        [
            {"id": "r1", "question": "ab", "times": "2", "loud": "yes"},
            {"id": "r2", "question": "cd", "times": 1},
        ],
    )
    env = {"SGLRUN_FAKE_REPLIES": '["fine thanks"]'}
    result = invoke(
        "batch", str(program), "rows.jsonl", "--id-field", "id", "--include", "text", *FAKE, env=env
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # stdout carries only data, and the data went to the file
    records = read_jsonl(isolated / "rows.out.jsonl")
    assert [r["id"] for r in records] == ["r1", "r2"]
    assert records[0]["vars"] == {"answer": "fine thanks"}
    assert records[0]["error"] is None
    assert records[0]["text"].startswith("Q: ABAB\n")
    assert records[1]["text"].startswith("Q: cd\n")
    assert "sglrun: 2 rows, 2 ok, 0 failed" in result.stderr
    assert "-> rows.out.jsonl" in result.stderr


def test_batch_csv_input_with_map_and_limit(isolated):
    program = write_program(isolated)
    (isolated / "rows.csv").write_text("q,times\nab,3\ncd,\nef,1\n")
    result = invoke(
        "batch", str(program), "rows.csv", "-o", "out.jsonl", "--map", "question=q",
        "--limit", "2", "--include", "input,text", *FAKE,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(isolated / "out.jsonl")
    assert [r["id"] for r in records] == ["0", "1"]
    assert records[0]["input"] == {"q": "ab", "times": "3"}
    assert records[0]["text"].startswith("Q: ababab\n")
    assert records[1]["text"].startswith("Q: cd\n")  # an empty cell keeps the default


def test_batch_stdin_to_stdout(isolated):
    program = write_program(isolated)
    rows = "".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(5))
    result = invoke("batch", str(program), "-", *FAKE, input=rows)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert "-> <stdout>" in result.stderr


def test_batch_csv_from_stdin_needs_no_suffix(isolated):
    program = write_program(isolated)
    result = invoke("batch", str(program), "-", "--format", "csv", *FAKE, input="question\nx\ny\n")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


def test_bad_rows_give_error_records_exit_1_and_good_rows_are_written(isolated):
    program = write_program(isolated)
    (isolated / "rows.jsonl").write_text(
        '{"question": "fine"}\n'
        "{not json\n"
        '{"question": "x", "times": "many"}\n'
        '{"question": "boom"}\n'
        '{"question": "also fine"}\n'
    )
    result = invoke("batch", str(program), "rows.jsonl", "-o", "out.jsonl", *FAKE)
    assert result.exit_code == 1
    records = read_jsonl(isolated / "out.jsonl")
    assert len(records) == 5
    assert [r["error"] is None for r in records] == [True, False, False, False, True]
    assert records[1]["error"]["type"] == "InputError"
    assert "rows.jsonl:2" in records[1]["error"]["message"]
    assert records[3]["error"] == {"type": "ValueError", "message": "the program refused this row"}
    assert "5 rows, 2 ok, 3 failed" in result.stderr
    assert "3 of 5 rows failed" in result.stderr


def test_backend_errors_are_row_errors(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "a"}, {"question": "b"}])
    env = {"SGLRUN_FAKE_REPLIES": '["ok", {"error": "server said no"}]'}
    result = invoke("batch", str(program), "rows.jsonl", "-o", "out.jsonl", *FAKE, env=env)
    assert result.exit_code == 1
    errors = [r["error"] for r in read_jsonl(isolated / "out.jsonl")]
    assert errors.count(None) == 1
    assert {"type": "BackendError", "message": "server said no"} in errors


def test_unordered_and_window_flags(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": f"q{i}"} for i in range(20)])
    result = invoke(
        "batch", str(program), "rows.jsonl", "-o", "out.jsonl", "--unordered", "--window", "2",
        "--num-threads", "4", *FAKE,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(int(r["id"]) for r in read_jsonl(isolated / "out.jsonl")) == list(range(20))


def test_strict_rejects_unknown_columns(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "a", "typo": 1}])
    result = invoke("batch", str(program), "rows.jsonl", "-o", "out.jsonl", "--strict", *FAKE)
    assert result.exit_code == 1
    assert "unknown column" in read_jsonl(isolated / "out.jsonl")[0]["error"]["message"]


# ----------------------------------------------------------------------------- resume


def test_resume_skips_done_ids_and_repairs_a_torn_line(isolated, monkeypatch):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"id": f"r{i}", "question": "q"} for i in range(6)])
    out = isolated / "out.jsonl"
    args = ["batch", str(program), "rows.jsonl", "-o", "out.jsonl", "--id-field", "id", *FAKE]
    # An earlier run (one row at a time, so the replies go in order) wrote r0, failed r1 and
    # was killed while writing r2: its last line is torn.
    monkeypatch.setenv("SGLRUN_FAKE_REPLIES", '["old", {"error": "failed before"}, "x"]')
    assert invoke(*args, "--limit", "3", "--num-threads", "1").exit_code == 1
    out.write_bytes(out.read_bytes()[:-20])
    monkeypatch.setenv("SGLRUN_FAKE_REPLIES", '["hello world"]')
    result = invoke(*args, "--resume")
    assert result.exit_code == 1, result.stderr  # the output still holds r1's failure
    assert "repaired" in result.stderr
    assert "--retry-errors" in result.stderr
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert records[0]["vars"]["answer"] == "old"  # kept, not run again
    assert records[1]["error"] is not None  # failed ids are skipped without --retry-errors
    assert "2 skipped" in result.stderr

    result = invoke(*args, "--resume", "--retry-errors")
    assert result.exit_code == 0, result.stderr
    records = read_jsonl(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == ["r0", "r1", "r2", "r3", "r4", "r5"]  # one record per id
    assert all(r["error"] is None for r in records)


def test_resume_into_stdout_is_a_usage_error(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke("batch", str(program), "rows.jsonl", "-o", "-", "--resume", *FAKE)
    assert result.exit_code == 2
    one_error_line(result)


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (None, "no such program file"),
        ("x = 1\n", "no @function found"),
        ("import sglrun as sgl\ndef broken(:\n", "prog.py:2: syntax error"),
        ("import sglrun\nraise RuntimeError('bad import')\n", "prog.py:2: error while loading"),
    ],
)
def test_broken_programs_exit_2_with_one_line(isolated, source, expected):
    if source is not None:
        write_program(isolated, source)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke("batch", "prog.py", "rows.jsonl", *FAKE)
    assert result.exit_code == 2
    assert expected in one_error_line(result)
    assert not (isolated / "rows.out.jsonl").exists()


def test_several_functions_need_function_flag(isolated):
    source = (
        "import sglrun as sgl\n\n@sgl.function\ndef one(s, question: str):\n    s += question\n\n"
        "@sgl.function\ndef two(s, question: str):\n    s += question + '!'\n"
    )
    program = write_program(isolated, source)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke("batch", str(program), "rows.jsonl", *FAKE)
    assert result.exit_code == 2
    assert "one, two" in one_error_line(result)
    result = invoke("batch", str(program), "rows.jsonl", "--function", "three", *FAKE)
    assert result.exit_code == 2
    assert "three" in one_error_line(result)
    result = invoke(
        "batch", str(program), "rows.jsonl", "--function", "two", "--include", "text", *FAKE
    )
    assert result.exit_code == 0, result.stderr
    assert read_jsonl(isolated / "rows.out.jsonl")[0]["text"] == "q!"


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_bad_num_threads_is_exit_2(isolated, value):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke("batch", str(program), "rows.jsonl", "--num-threads", value, *FAKE)
    assert result.exit_code == 2
    assert "--num-threads" in one_error_line(result)


def test_config_file_with_unknown_key_is_exit_2(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    (isolated / "conf.yaml").write_text("temprature: 0.5\n")
    result = invoke("batch", str(program), "rows.jsonl", "--config", "conf.yaml", *FAKE)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "temprature" in line and "temperature" in line


def test_unwritable_output_fails_before_any_row(isolated):
    marker = isolated / "ran.txt"
    source = (
        "import sglrun as sgl\n\n@sgl.function\ndef qa(s, question: str):\n"
        f"    open({str(marker)!r}, 'a').write('ran\\n')\n"
        "    s += sgl.gen('answer')\n"
    )
    program = write_program(isolated, source)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke("batch", str(program), "rows.jsonl", "-o", "missing/dir/out.jsonl", *FAKE)
    assert result.exit_code == 2
    assert "does not exist" in one_error_line(result)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["rows.jsonl", "--include", "everything"], "--include"),
        (["rows.jsonl", "--map", "nope"], "--map"),
        (["rows.jsonl", "--map", "nope=col"], "not a parameter"),
        (["rows.jsonl", "--window", "0"], "--window"),
        (["rows.jsonl", "--limit", "0"], "--limit"),
        (["rows.jsonl", "--temperature", "hot"], "--temperature"),
        (["rows.jsonl", "--backend", "nowhere"], "--backend"),
        (["rows.jsonl", "-o", "out.xlsx"], "unknown output format"),
        (["rows.jsonl", "-o", "rows.jsonl"], "overwrite the input"),
        (["missing.jsonl"], "no such input file"),
        (["empty.jsonl"], "no rows"),
        ([], "Missing argument"),
    ],
)
def test_usage_errors_are_exit_2_with_one_line(isolated, args, expected):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    (isolated / "empty.jsonl").write_text("\n")
    result = invoke("batch", str(program), *FAKE, *args)
    assert result.exit_code == 2, result.stderr
    assert expected in one_error_line(result)


def test_broken_csv_header_is_exit_2(isolated):
    program = write_program(isolated)
    (isolated / "rows.csv").write_text("question,question\na,b\n")
    result = invoke("batch", str(program), "rows.csv", *FAKE)
    assert result.exit_code == 2
    assert "repeats" in one_error_line(result)


# ----------------------------------------------------------------------------- run


def test_run_into_a_pipe_prints_only_the_json(isolated):
    """Not a terminal (`sglrun run prog.py | jq`): stdout carries the variables alone."""
    program = write_program(isolated)
    result = invoke("run", str(program), *FAKE, "--", "--question", "hi", "--times", "2")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"answer": "hello world"}


def test_run_on_a_terminal_streams_text_then_prints_variables(isolated):
    import pty

    program = write_program(isolated)
    leader, follower = pty.openpty()
    args = ["run", str(program), *FAKE, "--", "--question", "hi", "--times", "2"]
    with subprocess.Popen(
        [SGLRUN, *args], stdout=follower, stderr=subprocess.PIPE, cwd=isolated,
        env=clean_env(isolated),
    ) as process:  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(60)
    os.close(leader)
    out = b"".join(chunks).decode().replace("\r\n", "\n")
    assert process.returncode == 0, process.stderr
    text, _, tail = out.partition("\n{")
    assert text == "Q: hihi\nA:hello world"
    assert json.loads("{" + tail) == {"answer": "hello world"}


def test_run_help_after_a_program_shows_its_parameters(isolated):
    program = write_program(isolated)
    result = invoke("run", str(program), "--help")
    assert result.exit_code == 0, result.stderr
    assert "--backend" in result.stdout  # the command's own help comes first
    part = result.stdout[result.stdout.index("Program parameters") :]
    assert "--question: str  (required)" in part
    assert "--times: int = 1" in part and "--loud: bool = False" in part
    assert "Answer a question." in result.stdout  # the program's docstring


def test_run_json_prints_only_json_and_bool_flags_work(isolated):
    program = write_program(isolated)
    env = {"SGLRUN_FAKE_REPLIES": '["fine"]'}
    result = invoke("run", str(program), "--json", *FAKE, "--", "--question=hi", "--loud", env=env)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"answer": "fine"}


def test_run_program_error_is_exit_1(isolated):
    program = write_program(isolated)
    result = invoke("run", str(program), "--json", *FAKE, "--", "--question", "boom")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "ValueError: the program refused this row" in line
    raising = next(
        number
        for number, text in enumerate(program.read_text().splitlines(), 1)
        if "raise ValueError" in text
    )
    assert f"prog.py:{raising}: ValueError" in line  # the program's own line


def test_run_program_error_traceback_with_verbose(isolated):
    program = write_program(isolated)
    result = invoke("run", str(program), "-v", "--json", *FAKE, "--", "--question", "boom")
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "raise ValueError" in result.stderr


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (["--questoin", "x"], "unknown parameter --questoin"),
        (["--times", "2"], "missing required"),
        (["--question", "x", "--times", "many"], "--times: expected int"),
        (["stray"], "unexpected argument"),
    ],
)
def test_run_bad_parameters_are_exit_2(isolated, params, expected):
    program = write_program(isolated)
    result = invoke("run", str(program), *FAKE, "--", *params)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert expected in line
    if "unknown" in expected:
        assert "--question, --times, --loud" in line


# ----------------------------------------------------------------------------- inspect, config


def test_inspect_shows_parameters_variables_and_prompt(isolated):
    program = write_program(isolated)
    result = invoke("inspect", str(program), "--row", '{"question": "Why?", "times": "2"}')
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "qa(question, times, loud)" in out
    assert "question: str  (required)" in out
    assert "times: int = 1" in out and "loud: bool = False" in out
    assert "variables: answer" in out
    assert "Q: Why?Why?" in out and "A:{answer}" in out


def test_inspect_without_row_shows_placeholders(isolated):
    program = write_program(isolated)
    result = invoke("inspect", str(program))
    assert result.exit_code == 0, result.stderr
    assert "Q: {question}" in result.stdout


def test_inspect_bad_row_is_exit_2(isolated):
    program = write_program(isolated)
    for row in ("{nope", '{"unknown": 1}', "[1]"):
        result = invoke("inspect", str(program), "--row", row)
        assert result.exit_code == 2
        one_error_line(result)


def test_config_show_masks_the_key_and_names_sources(isolated):
    (isolated / "sglrun.yaml").write_text("backend: openai\nmodel: gpt-test\n")
    env = {"MY_KEY": "sk-very-secret-value", "SGLRUN_TEMPERATURE": "0.3"}
    result = invoke("config", "show", env={**env, "SGLRUN_API_KEY_ENV": "MY_KEY"})
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "sk-very-secret-value" not in out + result.stderr
    assert "openai" in out and "project file" in out
    assert "env SGLRUN_TEMPERATURE" in out
    assert "api_key" in out and "set" in out
    as_json = invoke("config", "show", "--json", env={**env, "SGLRUN_API_KEY_ENV": "MY_KEY"})
    data = json.loads(as_json.stdout)
    assert data["api_key"] == "set" and data["sources"]["model"].startswith("project file")
    assert "sk-very-secret-value" not in as_json.stdout


def test_config_show_unknown_key_is_exit_2(isolated):
    (isolated / "sglrun.yaml").write_text("api_key: sk-secret\n")
    result = invoke("config", "show")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "sk-secret" not in line and "api_key" in line


# ----------------------------------------------------------------------------- flags, backends


def test_verbose_logs_sglrun_loggers_to_stderr(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "boom"}])
    result = invoke("batch", str(program), "rows.jsonl", "-o", "-", "-v", *FAKE)
    assert result.exit_code == 1
    assert "sglrun: sglrun.batch.runner:" in result.stderr
    assert "row 0 failed" in result.stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines())


def test_unreachable_server_is_exit_2_before_any_row(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    env = {"SGLRUN_RETRIES": "0", "SGLRUN_TIMEOUT": "5"}
    result = invoke(
        "batch", str(program), "rows.jsonl", "--backend", "sglang", "--url",
        "http://127.0.0.1:9", "--insecure", env=env,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "127.0.0.1:9" in one_error_line(result)
    assert not (isolated / "rows.out.jsonl").exists()


def test_sampling_flags_become_run_defaults(isolated):
    source = (
        "import sglrun as sgl\n\n@sgl.function\ndef qa(s, question: str):\n"
        "    s += sgl.gen('answer')\n"
        "    s += sgl.gen('own', max_tokens=3)\n"
    )
    program = write_program(isolated, source)
    write_jsonl(isolated / "rows.jsonl", [{"question": "q"}])
    result = invoke(
        "batch", str(program), "rows.jsonl", "--include", "meta", "--max-new-tokens", "7",
        "--temperature", "0", "--stop", "###", *FAKE,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    meta = read_jsonl(isolated / "rows.out.jsonl")[0]["meta"]
    # the fake reports the length limit it was given: the flag is a default, a gen's own wins
    assert meta["answer"]["finish_reason"]["length"] == 7
    assert meta["own"]["finish_reason"]["length"] == 3


def test_keys_that_fill_no_parameter_are_warned_about_once(isolated):
    program = write_program(isolated)
    write_jsonl(isolated / "rows.jsonl", [{"question": "a", "tiems": 2}] * 3)
    result = invoke("batch", str(program), "rows.jsonl", *FAKE)
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "rows.jsonl:1: key 'tiems' fills no parameter of qa" in warnings[0]


def test_summary_mentions_retries():
    from sglrun.batch.runner import BatchStats
    from sglrun.cli.display import format_summary

    stats = BatchStats(done=3, ok=3, status="completed")
    assert "retr" not in format_summary(stats, "out.jsonl")
    line = format_summary(stats, "out.jsonl", retries=4)
    assert ", 4 retries," in line and line.endswith("-> out.jsonl")


# ----------------------------------------------------------------------------- capabilities

TYPED = """
import sglrun as sgl


@sgl.function
def typed(s, question: str):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("age", regex="[0-9]+", max_tokens=4))
"""


def test_a_backend_that_cannot_run_the_program_fails_before_any_row(isolated, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "backends"))
    from anthropic_stub import AnthropicStub

    program = write_program(isolated, TYPED)
    write_jsonl(isolated / "rows.jsonl", [{"question": "how old?"}] * 3)
    with AnthropicStub(api_key="ant-key") as stub:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "ant-key")
        result = invoke(
            "batch", str(program), "rows.jsonl", "--backend", "anthropic", "--model",
            "claude-test", "--url", stub.url,
        )  # fmt: skip
        assert result.exit_code == 2
        line = one_error_line(result)
        assert "cannot do what the program needs: regex (for 'age')" in line
        assert not [r for r in stub.requests if r["path"] == "/v1/messages"]
    assert not (isolated / "rows.out.jsonl").exists()


def test_inspect_says_what_the_program_needs_of_a_backend(isolated):
    program = write_program(isolated, TYPED)
    result = invoke("inspect", str(program))
    assert result.exit_code == 0
    assert "needs of a backend: regex (age)" in result.stdout


@pytest.mark.parametrize(
    ("header", "flags", "expected"),
    [
        ("body,times", ["--map", "question=bod"], "header: missing required argument(s): "
         "question (column 'bod')"),
        ("question,extra", ["--strict"], "header: unknown column(s) 'extra'"),
    ],
)  # fmt: skip
def test_csv_header_mistakes_fail_before_the_backend_starts(isolated, header, flags, expected):
    """No model file here: the header's error wins because it is checked first."""
    program = write_program(isolated)
    (isolated / "rows.csv").write_text(header + "\na,1\n")
    missing_model = str(isolated / "no-such-model.gguf")
    result = invoke("batch", str(program), "rows.csv", *flags, "--model", missing_model)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"rows.csv: {expected}" in line
    assert not (isolated / "rows.out.jsonl").exists()


def test_the_readme_inspect_example_runs_to_its_end():
    """Typed gens (dtype int) take a dry run's placeholder as it is, not as a bad int."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^sglrun inspect .*$", readme, re.M)
    assert command is not None
    args = shlex.split(command.group(0))[1:]
    args[1] = str(ROOT / args[1])
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert "dry run stopped" not in result.stdout
    assert "variables: year, age, person" in result.stdout
    assert "{age}" in result.stdout  # the typed gen's placeholder in the prompt


def test_dry_run_prints_each_rows_first_prompt_and_writes_nothing(isolated):
    program = write_program(isolated)
    rows = [{"question": "why", "times": 2}, {"question": "how", "times": "x"}, {"question": "a"}]
    write_jsonl(isolated / "rows.jsonl", rows)
    result = invoke("batch", str(program), "rows.jsonl", "--dry-run", *FAKE)
    assert result.exit_code == 1  # the second row cannot run
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["0", "1", "2"]  # row numbers, as records have
    assert lines[0]["prompt"] == "Q: whywhy\nA:" and lines[0]["error"] is None
    assert lines[1]["prompt"] is None and "--times" not in lines[1]["error"]["message"]
    assert "expected int" in lines[1]["error"]["message"]
    assert lines[2]["prompt"] == "Q: a\nA:"
    assert not (isolated / "rows.out.jsonl").exists()
