"""``sglrun batch --batch-api``: rounds as jobs, detach and rerun (exit 75), a killed process
that re-attaches, ``--status``, and the usage errors. Loopback stubs of the documented APIs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SGLRUN, clean_env, read_jsonl, write_jsonl, write_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from batch_stub import THREE_STEPS, AnthropicBatchStub, OpenAIBatchStub  # noqa: E402

ROWS = 500


@pytest.fixture
def job(tmp_path):
    write_program(tmp_path, THREE_STEPS)
    rows = [{"id": f"r{i}", "question": f"Question {i}?"} for i in range(ROWS)]
    rows[9]["question"] = "Question 9 PERMANENT?"
    write_jsonl(tmp_path / "in.jsonl", rows)
    return tmp_path


@pytest.fixture
def stub():
    with OpenAIBatchStub() as server:
        yield server


def command(url: str, *args: str, backend: str = "openai") -> list[str]:
    return [
        SGLRUN,
        "batch",
        "prog.py",
        "in.jsonl",
        "-o",
        "out.jsonl",
        "--id-field",
        "id",
        "--backend",
        backend,
        "--model",
        "gpt-4o-mini" if backend == "openai" else "claude",
        "--url",
        url if backend == "anthropic" else f"{url}/v1",
        "--batch-api",
        "--batch-poll",
        "0.05",
        *args,
    ]


def run(tmp_path, url, *args, backend="openai", timeout=180):
    env = clean_env(tmp_path, OPENAI_API_KEY="sk-test-secret", ANTHROPIC_API_KEY="sk-ant-key")
    return subprocess.run(
        command(url, *args, backend=backend),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=timeout,
        env=env,
    )


def check_output(tmp_path) -> None:
    records = read_jsonl(tmp_path / "out.jsonl")
    ids = [record["id"] for record in records]
    assert sorted(ids) == sorted(f"r{i}" for i in range(ROWS))  # every id exactly once
    for record in records:
        number = int(record["id"][1:])
        if number == 9:
            assert record["error"]["type"] == "BatchJobError"
            assert "injected 400" in record["error"]["message"]
            continue
        assert record["error"] is None, record
        assert record["vars"]["positive"] == ("yes" if number % 2 == 0 else "no")
        assert record["vars"]["answer"] == f"answer to Question {number}?"


def test_detached_runs_driven_like_cron_submit_each_call_once(job, stub):
    stub.batches.hold = True
    first = run(job, stub.url, "--detach")
    assert first.returncode == 75, first.stderr
    assert "still running" in first.stderr
    jobs_file = job / "out.jsonl.sglrun-batches.json"
    saved = json.loads(jobs_file.read_text())
    assert [len(j["calls"]) for j in saved["jobs"]] == [ROWS]
    again = run(job, stub.url, "--detach")  # the job still runs: re-attached, nothing sent
    assert again.returncode == 75, again.stderr
    assert len(stub.batches.jobs) == 1
    status = run(job, stub.url, "--status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.split("\t")[1] == "in_progress"
    stub.batches.hold = False
    stub.batches.release()
    codes = []
    for _ in range(6):  # each rerun finishes a round and submits the next
        done = run(job, stub.url, "--detach")
        codes.append(done.returncode)
        if done.returncode != 75:
            break
    assert codes[-1] == 1, done.stderr  # one row failed for good: exit 1
    assert "1 of" in done.stderr or "failed" in done.stderr
    check_output(job)
    assert [len(j["requests"]) for j in stub.batches.jobs] == [ROWS, ROWS - 1, ROWS - 1]
    assert stub.live_calls == 0
    assert "sk-test-secret" not in jobs_file.read_text()
    finished = run(job, stub.url, "--detach")  # cron goes on calling: nothing left to do
    assert finished.returncode == 1 and len(stub.batches.jobs) == 3
    assert len(read_jsonl(job / "out.jsonl")) == ROWS


def test_a_killed_run_reattaches_and_never_submits_a_call_twice(job, stub):
    stub.batches.hold = True
    env = clean_env(job, OPENAI_API_KEY="sk-test-secret")
    process = subprocess.Popen(
        command(stub.url),
        cwd=job,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not stub.batches.jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # it polls the job now
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert len(stub.batches.jobs) == 1
    stub.batches.release()
    done = run(job, stub.url)
    assert done.returncode == 1, done.stderr
    check_output(job)
    assert [len(j["requests"]) for j in stub.batches.jobs] == [ROWS, ROWS - 1, ROWS - 1]
    assert "billed at the batch discount" in done.stderr


def test_anthropic_batches_from_the_command_line(job):
    with AnthropicBatchStub() as server:
        done = run(job, server.url, backend="anthropic")
        assert done.returncode == 1, done.stderr
        check_output(job)
        assert [len(j["requests"]) for j in server.batches.jobs] == [ROWS, ROWS - 1, ROWS - 1]
        assert server.live_calls == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "sglang", "--url", "http://127.0.0.1:9", "--batch-api"], "needs --backend"),
        (["--backend", "openai", "--model", "m", "--detach"], "go with --batch-api"),
        (
            [
                "--backend",
                "openai",
                "--model",
                "m",
                "--url",
                "http://127.0.0.1:9/v1",
                "--batch-api",
                "--no-cache",
            ],
            "needs the call cache",
        ),
        (["--backend", "openai", "--model", "m", "--batch-api", "-o", "-"], "output file"),
        (["--backend", "openai", "--model", "m", "--batch-api", "--batch-poll", "0"], "> 0"),
    ],
)
def test_usage_errors_are_one_line(job, args, message):
    done = subprocess.run(
        [SGLRUN, "batch", "prog.py", "in.jsonl", *args],
        capture_output=True,
        text=True,
        cwd=job,
        timeout=60,
        env=clean_env(job),
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_broken_jobs_file_is_one_line_and_loses_nothing(job, stub):
    stub.batches.hold = True
    assert run(job, stub.url, "--detach").returncode == 75
    before = (job / "out.jsonl").read_bytes()
    jobs_file = job / "out.jsonl.sglrun-batches.json"
    jobs_file.write_text("{not json")
    done = run(job, stub.url)
    assert done.returncode == 2, done.stderr
    assert "out.jsonl.sglrun-batches.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert jobs_file.read_text() == "{not json"
    assert (job / "out.jsonl").read_bytes() == before
    assert len(stub.batches.jobs) == 1


def test_status_into_a_closed_pipe_exits_141_quietly(job, stub):
    jobs = [
        {
            "id": f"b{i}",
            "path": "/v1/chat/completions",
            "created": 0,
            "calls": ["x"],
            "state": "submitted",
        }
        for i in range(3000)
    ]
    (job / "out.jsonl.sglrun-batches.json").write_text(
        json.dumps({"version": 1, "provider": "openai", "jobs": jobs})
    )
    line = " ".join(command(stub.url, "--status"))
    done = subprocess.run(
        ["bash", "-c", f"{line} | head -1; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        cwd=job,
        timeout=120,
        env=clean_env(job, OPENAI_API_KEY="sk-test-secret"),
    )
    assert done.returncode == 141, done.stderr
    assert done.stdout.startswith("b0\t")
    assert "Traceback" not in done.stderr
