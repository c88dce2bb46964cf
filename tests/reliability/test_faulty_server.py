"""The faulty server itself: it speaks SGLang's native API and each fault does what it says."""

from __future__ import annotations

import json
import socket
import time

import pytest
import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from .faulty_server import Faults, FaultyServer, fake_tokens


def _post(http: urllib3.PoolManager, server: FaultyServer, body: dict, **kw):
    return http.request(
        "POST", server.url + "/generate", body=json.dumps(body), retries=False, **kw
    )


@pytest.fixture
def http():
    manager = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=2))
    yield manager
    manager.clear()


def test_native_api_without_faults(http):
    with FaultyServer(seed=3, max_lifetime=30) as server:
        info = json.loads(http.request("GET", server.url + "/get_model_info").data)
        assert info["model_path"] == "faulty/fake-model"

        body = {"text": "Q row=r7 says", "sampling_params": {"max_new_tokens": 8}}
        first = json.loads(_post(http, server, body).data)
        again = json.loads(_post(http, server, body).data)
        assert first["text"] == again["text"] and first["text"].strip()  # deterministic
        assert first["meta_info"]["prompt_tokens"] == len(fake_tokens(body["text"]))
        assert first["meta_info"]["finish_reason"]["type"] in ("stop", "length")

        prefix = {"text": "Q row=r7 is", "sampling_params": {"max_new_tokens": 0}}
        assert json.loads(_post(http, server, prefix).data)["text"] == ""

        scoring = {
            "text": ["Q row=r7 is yes", "Q row=r7 is no"],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": 1,
        }
        answers = json.loads(_post(http, server, scoring).data)
        assert len(answers) == 2
        for answer, choice in zip(answers, ("yes", "no")):
            triples = answer["meta_info"]["input_token_logprobs"]
            assert all(len(t) == 3 for t in triples)
            assert "".join(t[2] for t in triples).endswith(" " + choice)

        stream = {"text": "Q row=r8", "stream": True, "sampling_params": {"max_new_tokens": 8}}
        raw = _post(http, server, stream).data.decode()
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["text"] == json.loads(_post(http, server, {
            "text": "Q row=r8", "sampling_params": {"max_new_tokens": 8}}).data)["text"]

        counts = server.requests_per_row()
        assert counts == {"r7": 4, "r8": 2}
        assert [e.kind for e in server.since()][:4] == ["gen", "gen", "prefix", "select"]
        assert server.outcomes() == {"ok": 6}


def test_error_and_rate_limit_statuses(http):
    with FaultyServer(Faults(error_rate=1.0), max_lifetime=30) as server:
        answer = _post(http, server, {"text": "row=r1"})
        assert answer.status in (500, 503)
        assert "injected fault" in json.loads(answer.data)["error"]["message"]
    with FaultyServer(Faults(rate_limit_rate=1.0, retry_after="0.2"), max_lifetime=30) as server:
        answer = _post(http, server, {"text": "row=r1"})
        assert answer.status == 429 and answer.headers["Retry-After"] == "0.2"
    with FaultyServer(Faults(fail_rows=frozenset({"r2"})), max_lifetime=30) as server:
        assert _post(http, server, {"text": "row=r1"}).status == 200
        assert _post(http, server, {"text": "row=r2"}).status == 500


def test_reset_cut_and_bad_json(http):
    with FaultyServer(Faults(reset_rate=1.0), max_lifetime=30) as server:
        with pytest.raises(ProtocolError, match="reset"):
            _post(http, server, {"text": "row=r1"})
    with FaultyServer(Faults(cut_rate=1.0), max_lifetime=30) as server:
        with pytest.raises(ProtocolError):
            _post(http, server, {"text": "row=r1", "sampling_params": {"max_new_tokens": 8}})
        response = _post(
            http, server, {"text": "row=r1 a b", "stream": True}, preload_content=False
        )
        received = b""
        with pytest.raises(ProtocolError):
            for chunk in response.stream(64):
                received += chunk
        assert received.startswith(b"data: ")  # half a stream arrived, then the cut
        assert b"[DONE]" not in received
    with FaultyServer(Faults(bad_json_rate=1.0), max_lifetime=30) as server:
        answer = _post(http, server, {"text": "row=r1"})
        assert answer.status == 200
        with pytest.raises(ValueError):
            json.loads(answer.data)


def test_hang_outlasts_the_read_timeout(http):
    with FaultyServer(Faults(hang_rate=1.0, hang_seconds=3), max_lifetime=30) as server:
        started = time.monotonic()
        with pytest.raises(ReadTimeoutError):
            _post(http, server, {"text": "row=r1"}, timeout=urllib3.Timeout(connect=1, read=0.5))
        assert time.monotonic() - started < 2
    # stop() wakes the hanging handler: leaving the block above took no 3 s


def test_disappears_and_comes_back_on_the_same_port(http):
    faults = Faults(disappear_after=2, disappear_seconds=1.0)
    with FaultyServer(faults, max_lifetime=30) as server:
        port = server.port
        assert _post(http, server, {"text": "row=r1"}).status == 200
        with pytest.raises(ProtocolError):
            _post(http, server, {"text": "row=r2"})  # the request that makes it go away
        time.sleep(0.2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        assert server.port == port
        assert _post(http, server, {"text": "row=r3"}).status == 200
        (start, end), = server.downtimes
        assert 0.9 <= end - start < 3


def test_fault_draws_are_seeded_and_order_independent(http):
    faults = Faults(error_rate=0.5)
    outcomes = []
    for order in (range(40), reversed(range(40))):
        with FaultyServer(faults, seed=11, max_lifetime=30) as server:
            for index in order:
                _post(http, server, {"text": f"row=r{index}"})
            outcomes.append(sorted((e.row, e.outcome) for e in server.since()))
    assert outcomes[0] == outcomes[1]
    assert 5 < sum(1 for _, outcome in outcomes[0] if outcome == "error") < 35


def test_stops_by_itself():
    server = FaultyServer(max_lifetime=0.5).start()
    port = server.port
    time.sleep(1.0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_echo_headers_quotes_the_request_headers(http):
    with FaultyServer(Faults(error_rate=1.0, echo_headers=True), max_lifetime=30) as server:
        answer = http.request(
            "POST", server.url + "/generate", body=json.dumps({"text": "row=r1"}),
            headers={"Authorization": "Bearer abc123"}, retries=False,
        )
        assert "Authorization: Bearer abc123" in json.loads(answer.data)["error"]["message"]
        assert server.headers_seen[-1]["Authorization"] == "Bearer abc123"
