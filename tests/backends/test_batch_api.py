"""Whole programs over the provider batch APIs (loopback stubs of the documented APIs).

A 3-step program with ``select`` and a branch needs three rounds: every row's first call goes
out as one job, then every row's ``select``, then each row's branch. Counted at the stub.
"""

from __future__ import annotations

import json
import os

import pytest
from batch_stub import THREE_STEPS, AnthropicBatchStub, OpenAIBatchStub, answer_text

import sglrun as sgl
from sglrun.backends.batch_providers import OpenAIBatchAPI

_namespace: dict = {}
exec(THREE_STEPS, _namespace)  # the program the CLI tests run from a file
three_steps = _namespace["three"]


SCHEMA = '{"type": "object", "properties": {"name": {"type": "string"}}}'


def rows(count: int, marks: dict[int, str] | None = None) -> list[dict[str, str]]:
    marks = marks or {}
    return [{"question": f"Question {i}{marks.get(i, '')}?"} for i in range(count)]


def check_row(row: dict[str, str], state: sgl.ProgramState) -> None:
    question = row["question"]
    number = int(question.split()[1].rstrip("?").rstrip("FLAKY").rstrip())
    assert state["answer"] == f"answer to {question}"
    expected = "yes" if number % 2 == 0 else "no"
    assert state["positive"] == expected
    if expected == "yes":
        assert state["why"] == "answer to Why?"
    else:
        assert state["why_not"] == "answer to Why not?"


def openai(stub: OpenAIBatchStub, tmp_path, **kwargs) -> sgl.OpenAI:
    return sgl.OpenAI(
        "gpt-4o-mini",
        base_url=f"{stub.url}/v1",
        api_key="sk-test-secret",
        batch=True,
        batch_jobs=str(tmp_path / "jobs.json"),
        batch_poll=0.05,
        **kwargs,
    )


@pytest.fixture
def stub():
    with OpenAIBatchStub() as server:
        yield server


def test_each_round_of_500_programs_is_one_job(stub, tmp_path):
    backend = openai(stub, tmp_path)
    data = rows(500)
    states = three_steps.run_batch(data, backend=backend)
    for row, state in zip(data, states):
        assert state.error() is None
        check_row(row, state)
    jobs = stub.batches.jobs
    assert len(jobs) == 3  # the answer, the select, the branch
    assert [len(job["requests"]) for job in jobs] == [500, 500, 500]
    assert stub.live_calls == 0
    saved = json.loads((tmp_path / "jobs.json").read_text())
    assert [job["id"] for job in saved["jobs"]] == [job["id"] for job in jobs]
    assert all(job["state"] == "completed" for job in saved["jobs"])
    assert "sk-test-secret" not in (tmp_path / "jobs.json").read_text()
    backend.shutdown()


def test_a_permanent_error_is_one_error_row_and_a_flaky_call_is_sent_again(stub, tmp_path):
    backend = openai(stub, tmp_path)
    data = rows(40, {7: " PERMANENT", 12: " FLAKY"})
    states = three_steps.run_batch(data, backend=backend)
    failed = [i for i, state in enumerate(states) if state.error() is not None]
    assert failed == [7]
    assert "injected 400" in str(states[7].error())
    check_row(data[12], states[12])
    # round 1: 40 requests; the flaky one again in a job of its own; then rounds 2 and 3
    assert [len(job["requests"]) for job in stub.batches.jobs] == [40, 1, 39, 39]
    backend.shutdown()


def test_an_expired_job_sends_what_it_did_not_reach_again(stub, tmp_path):
    backend = openai(stub, tmp_path)
    stub.batches.expire_next = True
    data = rows(20)
    states = three_steps.run_batch(data, backend=backend)
    for row, state in zip(data, states):
        check_row(row, state)
    assert [len(job["requests"]) for job in stub.batches.jobs] == [20, 10, 20, 20]
    backend.shutdown()


def test_jobs_are_split_at_the_request_limit(stub, tmp_path, monkeypatch):
    monkeypatch.setattr(OpenAIBatchAPI, "max_requests", 30)
    backend = openai(stub, tmp_path)
    data = rows(70)
    states = three_steps.run_batch(data, backend=backend)
    for row, state in zip(data, states):
        check_row(row, state)
    assert [len(job["requests"]) for job in stub.batches.jobs] == [30, 30, 10] * 3
    backend.shutdown()


def test_jobs_are_split_at_the_byte_limit(stub, tmp_path, monkeypatch):
    backend = openai(stub, tmp_path)
    monkeypatch.setattr(backend.transport.wave.api, "max_bytes", 4000)
    data = rows(30)
    states = three_steps.run_batch(data, backend=backend)
    for row, state in zip(data, states):
        check_row(row, state)
    first_round = [len(j["requests"]) for j in stub.batches.jobs if "answer" not in str(j)]
    assert sum(len(j["requests"]) for j in stub.batches.jobs) == 90
    assert len(stub.batches.jobs) > 3 and first_round
    for file_id, data_bytes in stub.files.items():
        if not file_id.startswith("file-out") and not file_id.startswith("file-err"):
            assert len(data_bytes) <= 4000
    backend.shutdown()


def test_a_new_process_reattaches_to_a_job_still_running(stub, tmp_path):
    """The first backend submits and is abandoned while the job runs (as a killed process
    would); a second one over the same jobs file waits for that job and submits no call twice."""
    stub.batches.hold = True
    first = openai(stub, tmp_path)
    wave = first.transport.wave
    wave.detach = True
    left = []
    wave.on_detach = lambda: left.append(True) or wave.close()
    data = rows(10)
    states = three_steps.run_batch(data, backend=first)
    assert left and all(state.error() is not None for state in states)
    assert len(stub.batches.jobs) == 1
    stub.batches.release()
    second = openai(stub, tmp_path)
    states = three_steps.run_batch(data, backend=second)
    for row, state in zip(data, states):
        check_row(row, state)
    assert [len(job["requests"]) for job in stub.batches.jobs] == [10, 10, 10]
    second.shutdown()


def test_sampled_duplicates_get_their_own_ids_and_greedy_ones_go_once(stub, tmp_path):
    @sgl.function
    def sample(s):
        s += sgl.user("Say something")
        s += sgl.assistant(sgl.gen("many", max_tokens=8, n=3, temperature=0.9))

    backend = openai(stub, tmp_path)
    states = sample.run_batch([{}] * 4, backend=backend)
    for state in states:
        assert state["many"] == [
            answer_text([{"role": "user", "content": "Say something"}], i) for i in range(3)
        ]
    (job,) = stub.batches.jobs
    ids = [request["custom_id"] for request in job["requests"]]
    assert len(ids) == 4 and len(set(ids)) == 4

    @sgl.function
    def greedy(s):
        s += sgl.user("Say one thing")
        s += sgl.assistant(sgl.gen("one", max_tokens=8, temperature=0))

    states = greedy.run_batch([{}] * 6, backend=backend)
    assert [state["one"] for state in states] == ["answer to Say one thing"] * 6
    assert len(stub.batches.jobs[-1]["requests"]) == 1  # asked and paid once
    backend.shutdown()


def test_a_single_run_and_streaming_work_off_the_hub(stub, tmp_path):
    backend = openai(stub, tmp_path)
    chunks: list[str] = []

    @sgl.function
    def one(s):
        s += sgl.user("Hello")
        s += sgl.assistant(sgl.gen("reply", max_tokens=8))

    state = one.run(backend=backend, stream=True)
    for chunk in state.text_iter("reply"):
        chunks.append(chunk)
    assert state["reply"] == "answer to Hello"
    assert "".join(chunks) == "answer to Hello"
    assert len(stub.batches.jobs) == 1
    backend.shutdown()


@pytest.fixture
def anthropic_stub():
    with AnthropicBatchStub() as server:
        yield server


def test_anthropic_rounds_errors_and_n(anthropic_stub, tmp_path):
    backend = sgl.Anthropic(
        "claude-test",
        api_key="sk-ant-secret",
        base_url=anthropic_stub.url,
        batch=True,
        batch_jobs=str(tmp_path / "a.json"),
        batch_poll=0.05,
    )
    data = rows(30, {3: " PERMANENT", 4: " FLAKY"})
    states = three_steps.run_batch(data, backend=backend)
    assert [i for i, s in enumerate(states) if s.error() is not None] == [3]
    for index, (row, state) in enumerate(zip(data, states)):
        if index != 3:
            check_row(row, state)
    assert [len(job["requests"]) for job in anthropic_stub.batches.jobs] == [30, 1, 29, 29]
    assert anthropic_stub.live_calls == 0
    ids = [r["custom_id"] for job in anthropic_stub.batches.jobs for r in job["requests"]]
    assert all(len(i) <= 64 for i in ids)
    assert "sk-ant-secret" not in (tmp_path / "a.json").read_text()

    @sgl.function
    def twice(s):
        s += sgl.user("Pick")
        s += sgl.assistant(sgl.gen("picks", max_tokens=4, n=2, temperature=1.0))

    before = len(anthropic_stub.batches.jobs)
    state = twice.run_batch([{}], backend=backend)[0]
    assert state["picks"] == ["answer to Pick", "answer to Pick"]
    assert len(anthropic_stub.batches.jobs) == before + 1  # both samples in one round

    @sgl.function
    def shaped(s):
        s += sgl.user("Name it")
        s += sgl.assistant(sgl.gen("name", max_tokens=32, json_schema=SCHEMA))

    state = shaped.run_batch([{}], backend=backend)[0]
    assert json.loads(state["name"]) == {"name": "answer to Name it"}
    params = anthropic_stub.batches.jobs[-1]["requests"][0]["params"]
    assert params["tools"][0]["input_schema"] == json.loads(SCHEMA)
    assert params["tool_choice"] == {"type": "tool", "name": params["tools"][0]["name"]}
    assert os.path.exists(tmp_path / "a.json")
    backend.shutdown()


def test_forks_join_the_round_and_a_schema_goes_as_response_format(stub, tmp_path):
    schema = '{"type": "object", "properties": {"name": {"type": "string"}}}'

    @sgl.function
    def branches(s, topic):
        s += sgl.user(f"About {topic}")
        forks = s.fork(3)
        for index, fork in enumerate(forks):
            fork += sgl.assistant(sgl.gen("idea", max_tokens=8, temperature=0.5 + index / 10))
        forks.join()
        s += sgl.user("Name it")
        s += sgl.assistant(sgl.gen("name", max_tokens=16, json_schema=schema))

    backend = openai(stub, tmp_path)
    states = branches.run_batch([{"topic": f"t{i}"} for i in range(5)], backend=backend)
    for state in states:
        assert state.error() is None
        assert json.loads(state["name"]) == {"name": "answer to Name it"}
    first, second = stub.batches.jobs
    assert len(first["requests"]) == 15  # 5 rows x 3 forks: one round
    assert len(second["requests"]) == 5
    formats = [r["body"]["response_format"]["type"] for r in second["requests"]]
    assert formats == ["json_schema"] * 5
    backend.shutdown()
