"""The pooled transport: retries, Retry-After, time bounds, timeouts, endpoint balancing and
cool-down, SSE parsing, and that API keys never leak into errors, reprs or logs."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sglang_stub import SGLangStub, StubServer, free_port

from sglrun.backends.http import EndpointPool, HTTPTransport, _parse_sse, error_message
from sglrun.errors import InvalidArgumentError, ServerError, TransportError

SECRET = "sk-test-0123456789abcdef"


@pytest.fixture
def stub():
    server = SGLangStub()
    yield server
    server.stop()


def fast(url, **kw):
    """A transport with tiny backoffs so retry tests take milliseconds."""
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    kw.setdefault("timeout", (1.0, 5.0))
    return HTTPTransport(url, **kw)


def test_json_request_and_stats(stub):
    t = fast(stub.url)
    assert t.request("GET", "/get_model_info")["model_path"] == SGLangStub.model_path
    assert t.request("POST", "/flush_cache", {"empty_cache": True}) == "Cache flushed.\n"
    assert stub.posted("/flush_cache") == [{"empty_cache": True}]
    stats = t.stats
    assert (stats.requests, stats.retries, stats.failures) == (2, 0, 0)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_status_is_retried(stub, status):
    stub.fail("/get_model_info", times=2, status=status)
    t = fast(stub.url)
    assert t.request("GET", "/get_model_info")["model_path"]
    assert t.stats.retries == 2
    assert len(stub.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_is_not_retried_and_keeps_server_message(stub, status):
    stub.fail("/generate", status=status, body={"error": {"message": "bad max_new_tokens"}})
    t = fast(stub.url)
    with pytest.raises(ServerError) as info:
        t.request("POST", "/generate", {"text": "x"})
    assert info.value.status == status
    assert info.value.server_message == "bad max_new_tokens"
    assert f"{stub.url}/generate" in str(info.value)
    assert len(stub.requests) == 1
    assert (t.stats.retries, t.stats.failures) == (0, 1)


def test_retry_after_seconds_is_honoured(stub):
    stub.fail("/get_model_info", status=429, retry_after=0.6)
    t = fast(stub.url)
    t.request("GET", "/get_model_info")
    first, second = stub.requests
    assert second["time"] - first["time"] >= 0.55


def test_retry_after_http_date_is_honoured(stub):
    from email.utils import formatdate

    stub.fail("/get_model_info", status=503, retry_after=formatdate(time.time() + 2, usegmt=True))
    t = fast(stub.url)
    t.request("GET", "/get_model_info")
    first, second = stub.requests
    assert second["time"] - first["time"] >= 0.5  # the date has one-second resolution


def test_retries_are_bounded_by_count(stub):
    stub.fail("/get_model_info", times=10, status=503, body={"detail": "warming up"})
    t = fast(stub.url, retries=3)
    with pytest.raises(ServerError) as info:
        t.request("GET", "/get_model_info")
    assert info.value.status == 503 and info.value.server_message == "warming up"
    assert len(stub.requests) == 4
    assert t.stats.retries == 3 and t.stats.failures == 1


def test_retries_are_bounded_by_total_time(stub):
    stub.fail("/get_model_info", times=10, status=429, retry_after=0.4)
    t = fast(stub.url, retries=50, retry_time=1.0)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        t.request("GET", "/get_model_info")
    assert info.value.status == 429
    assert time.monotonic() - started < 1.5
    assert 2 <= len(stub.requests) <= 4


def test_long_retry_after_beyond_budget_fails_at_once(stub):
    stub.fail("/get_model_info", status=429, retry_after=3600)
    t = fast(stub.url, retry_time=5.0)
    started = time.monotonic()
    with pytest.raises(ServerError):
        t.request("GET", "/get_model_info")
    assert time.monotonic() - started < 1.0


def test_read_timeout_is_a_transport_error_without_retry(stub):
    stub.fail("/generate", delay=1.5)
    t = fast(stub.url, timeout=(1.0, 0.3))
    with pytest.raises(TransportError, match="read timeout"):
        t.request("POST", "/generate", {"text": "x"})
    assert t.stats.retries == 0


def test_connection_reset_is_retried(stub):
    stub.fail("/get_model_info", times=2, reset=True)
    t = fast(stub.url)
    assert t.request("GET", "/get_model_info")["model_path"]
    assert t.stats.retries == 2


def test_connection_refused_gives_transport_error():
    t = fast(f"http://127.0.0.1:{free_port()}", retries=2)
    with pytest.raises(TransportError, match="connection failed"):
        t.request("GET", "/get_model_info")
    assert t.stats.retries == 2 and t.stats.failures == 1


def test_error_message_extraction():
    assert error_message(b'{"error": {"message": "m1", "type": "x"}}') == "m1"
    assert error_message(b'{"error": "m2"}') == "m2"
    assert error_message(b'{"detail": "m3"}') == "m3"
    assert error_message(b'{"detail": [{"loc": ["body", "text"], "msg": "missing"}]}') == (
        "body.text: missing"
    )
    assert error_message(b'{"message": "m4"}') == "m4"
    assert error_message(b"plain failure\n") == "plain failure"
    assert error_message(b"") == "(empty response body)"
    assert error_message(b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}') \
        == "busy"


def test_sse_parsing():
    lines = [
        ": comment", "event: message_start", 'data: {"a": 1}', "",
        "data: line1", "data: line2", "",
        'data: {"b": 2}', "", "data: [DONE]", "", 'data: {"never": 1}', "",
    ]
    events = list(_parse_sse(lines))
    assert events == [("message_start", {"a": 1}), (None, "line1\nline2"), (None, {"b": 2})]


def test_stream_reads_events_and_errors(stub):
    t = fast(stub.url)
    events = list(t.stream("POST", "/generate", {"text": "hi", "stream": True,
                                                  "sampling_params": {"max_new_tokens": 3}}))
    assert [e.data["text"] for e in events] == [" the", " the quick", " the quick brown"]
    stub.fail("/generate", status=503)
    assert len(list(t.stream("POST", "/generate", {"text": "hi", "stream": True}))) == 9
    assert t.stats.retries == 1


class _ErrorStream(StubServer):
    def route(self, handler, method, path, body):
        handler.start_sse()
        handler.send_chunk('data: {"text": "partial"}\n\n')
        handler.send_chunk('data: {"error": {"message": "out of memory", "code": 500}}\n\n')
        handler.end_chunks()


def test_error_event_in_stream_raises_server_error():
    with _ErrorStream() as server:
        t = fast(server.url)
        seen = []
        with pytest.raises(ServerError, match="out of memory") as info:
            for event in t.stream("POST", "/x", {}):
                seen.append(event.data)
        assert seen == [{"text": "partial"}] and info.value.status == 500


def test_endpoint_pool_prefers_fewest_in_flight():
    pool = EndpointPool(["http://a", "http://b", "http://c"])
    first, second, third = pool.acquire(), pool.acquire(), pool.acquire()
    assert {first.url, second.url, third.url} == {"http://a", "http://b", "http://c"}
    pool.release(second, failed=False)
    assert pool.acquire().url == second.url  # the only one with nothing in flight


def test_endpoint_pool_cooldown_doubles_and_recovers():
    now = [100.0]
    pool = EndpointPool(["http://a", "http://b"], cooldown=5.0, clock=lambda: now[0])
    a, b = pool.endpoints
    assert pool.acquire() is a
    pool.release(a, failed=True)
    assert a.cooldown == 5.0 and a.in_flight == 0
    for _ in range(5):
        chosen = pool.acquire()
        assert chosen is b
        pool.release(chosen, failed=False)
    now[0] += 5.1  # the cool-down is over: a is used again
    assert {pool.acquire().url, pool.acquire().url} == {"http://a", "http://b"}
    pool.release(a, failed=True)
    assert a.cooldown == 10.0  # doubled while it keeps failing
    pool.release(b, failed=True)
    assert b.cooldown == 5.0
    assert pool.acquire() is b  # both resting: the one back soonest is used
    pool.release(a, failed=False)
    assert a.cooldown == 0.0 and a.failures == 0 and a.cooldown_until == 0.0


def test_endpoint_pool_rejects_bad_urls():
    with pytest.raises(InvalidArgumentError):
        EndpointPool([])
    with pytest.raises(InvalidArgumentError):
        EndpointPool(["ftp://x"])


def test_dead_endpoint_is_skipped_after_first_failure(stub):
    dead = f"http://127.0.0.1:{free_port()}"
    t = fast([dead, stub.url], cooldown=30.0)
    for _ in range(8):
        assert t.request("GET", "/get_model_info")["model_path"]
    assert len(stub.requests) == 8
    assert t.stats.retries <= 1  # at most one request met the dead endpoint, then it rested
    dead_state = next(e for e in t.pool.snapshot() if e["url"] == dead)
    assert dead_state["resting_for"] > 20


def test_balancing_over_two_live_servers():
    with SGLangStub() as one, SGLangStub() as two:
        one.fail("/generate", times=100, delay=0.05)  # slow server: fewer requests go there
        t = fast([one.url, two.url])

        def work():
            for _ in range(5):
                t.request("POST", "/generate", {"text": "x", "sampling_params":
                                                {"max_new_tokens": 1}})

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counts = len(one.posted("/generate")), len(two.posted("/generate"))
        assert sum(counts) == 20 and counts[0] >= 1 and counts[1] > counts[0]


class _EchoKey(StubServer):
    def route(self, handler, method, path, body):
        key = handler.headers.get("Authorization", "")
        handler.send_json(401, {"error": {"message": f"Incorrect API key provided: {key}"}})


def test_api_key_never_in_errors_reprs_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    with _EchoKey() as server:
        t = fast(server.url, headers={"Authorization": f"Bearer {SECRET}"})
        with pytest.raises(ServerError) as info:
            t.request("GET", "/x")
        assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    texts = [str(info.value), repr(info.value), info.value.server_message, repr(t)]
    dead = fast(f"http://127.0.0.1:{free_port()}", retries=1,
                headers={"x-api-key": SECRET})
    with pytest.raises(TransportError) as info2:
        dead.request("POST", "/v1/messages", {"k": SECRET[:3]})
    texts += [str(info2.value), repr(dead), caplog.text]
    assert "***" in str(info.value)
    for text in texts:
        assert SECRET not in text
    assert "retry 1/1" in caplog.text  # the retry was logged, without the key


def test_verify_options():
    assert HTTPTransport("https://127.0.0.1:1").verify is True
    assert HTTPTransport("https://127.0.0.1:1", verify=False).verify is False


def test_tls_is_verified_by_default():
    # A plain-HTTP stub spoken to over https fails the TLS handshake: not retried.
    with SGLangStub() as server:
        t = fast(server.url.replace("http://", "https://"), retries=3)
        with pytest.raises(TransportError, match="TLS"):
            t.request("GET", "/get_model_info")
        assert t.stats.retries == 0


class _SlowEnd(StubServer):
    def route(self, handler, method, path, body):
        if path == "/ping":
            handler.send_json(200, {"ok": True})
            return
        handler.start_sse()
        handler.send_chunk('data: {"n": 1}\n\n')
        handler.send_chunk("data: [DONE]\n\n")
        time.sleep(0.1)  # the last chunk comes after [DONE], as llama.cpp sends it
        handler.end_chunks()


def test_connection_is_clean_after_a_stream():
    with _SlowEnd() as server:
        t = fast(server.url)
        for _ in range(3):
            assert [e.data for e in t.stream("POST", "/s", {})] == [{"n": 1}]
            assert t.request("GET", "/ping") == {"ok": True}
        assert t.stats.retries == 0


def test_none_means_default_timeout_and_retries(stub):
    t = HTTPTransport(stub.url, timeout=None, retries=None)
    assert t.retries == 4 and t.timeout.read_timeout == 600.0
    assert t.request("GET", "/get_model_info")["model_path"]
