"""The coalescer on its own: batching under load, order, error isolation, adaptivity."""

from __future__ import annotations

import threading
import time

import pytest

from sglrun.backends.coalesce import Coalescer
from sglrun.errors import ServerError, TransportError


class Recorder:
    """A send_batch that records each batch; items naming 'bad' poison the whole batch."""

    def __init__(self, delay: float = 0.0, error: type[Exception] = ServerError) -> None:
        self.batches: list[list[dict]] = []
        self.delay = delay
        self.error = error
        self.lock = threading.Lock()

    def __call__(self, items: list[dict]) -> list[str]:
        with self.lock:
            self.batches.append(items)
        time.sleep(self.delay)
        if any(item["text"] == "bad" for item in items):
            raise ServerError(500, "poisoned") if self.error is ServerError else self.error("x")
        return [item["text"].upper() for item in items]


def hammer(coalescer: Coalescer, texts: list[str]) -> dict[str, object]:
    results: dict[str, object] = {}

    def call(text: str) -> None:
        try:
            results[text] = coalescer.call([{"text": text}])[0]
        except Exception as exc:
            results[text] = exc

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_alone_when_idle():
    send = Recorder()
    coalescer = Coalescer(send, max_in_flight=2)
    assert coalescer.call([{"text": "a"}, {"text": "b"}]) == ["A", "B"]
    assert send.batches == [[{"text": "a"}, {"text": "b"}]]


def test_concurrent_callers_share_batches_and_get_their_own_results():
    send = Recorder(delay=0.05)
    coalescer = Coalescer(send, max_in_flight=1)
    texts = [f"t{i}" for i in range(30)]
    results = hammer(coalescer, texts)
    assert results == {t: t.upper() for t in texts}
    assert len(send.batches) < 30
    assert max(len(batch) for batch in send.batches) > 1


def test_max_batch_bounds_a_request():
    send = Recorder(delay=0.05)
    coalescer = Coalescer(send, max_in_flight=1, max_batch=4)
    hammer(coalescer, [f"t{i}" for i in range(20)])
    assert max(len(batch) for batch in send.batches) <= 4


def test_a_refused_batch_is_split_so_one_bad_item_fails_alone():
    send = Recorder(delay=0.05)
    coalescer = Coalescer(send, max_in_flight=1)
    texts = [f"t{i}" for i in range(12)] + ["bad"]
    results = hammer(coalescer, texts)
    assert isinstance(results["bad"], ServerError)
    assert all(results[t] == t.upper() for t in texts if t != "bad")


def test_a_batch_lost_in_transport_is_split_too():
    """A timeout or a broken answer on a list request is no reason to fail its other rows:
    each is resent alone, and only the row that fails alone ends in error."""
    send = Recorder(delay=0.05, error=TransportError)
    coalescer = Coalescer(send, max_in_flight=1)
    texts = [f"t{i}" for i in range(6)] + ["bad"]
    results = hammer(coalescer, texts)
    assert isinstance(results["bad"], TransportError)
    assert all(results[t] == t.upper() for t in texts if t != "bad")
    assert any(len(batch) > 1 for batch in send.batches)


def test_slow_round_trips_turn_coalescing_off():
    send = Recorder(delay=0.08)
    coalescer = Coalescer(send, max_in_flight=1, latency_threshold=0.05)
    coalescer.call([{"text": "warm"}])
    assert coalescer.latency > 0.0
    assert coalescer.slow  # its one round trip (80 ms) is over the threshold
    hammer(coalescer, [f"t{i}" for i in range(8)])
    assert all(len(batch) == 1 for batch in send.batches)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_no_caller_is_left_waiting(in_flight):
    send = Recorder(delay=0.01)
    coalescer = Coalescer(send, max_in_flight=in_flight, max_batch=3)
    texts = [f"t{i}" for i in range(50)]
    assert hammer(coalescer, texts) == {t: t.upper() for t in texts}


@pytest.mark.timeout(60)
def test_sending_slots_are_never_lost_under_churn():
    """Every slot handed out comes back: callers that keep arriving while batches finish
    (a slot can be handed to the same queued caller twice) never leave the queue stranded."""
    import random

    send = Recorder()

    def jittery(items):
        time.sleep(random.random() * 0.002)
        return send(items)

    coalescer = Coalescer(jittery, max_in_flight=2)
    done: list[int] = []

    def worker(index: int) -> None:
        for round_ in range(40):
            assert coalescer.call([{"text": f"w{index}r{round_}"}]) == [f"W{index}R{round_}"]
        done.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert sorted(done) == list(range(32))
    assert coalescer._in_flight == 0 and not coalescer._queue
