"""The one scheduler under run_batch and sglrun batch: slots free on completion (a slow row
never holds up the rows after it), order restored by the caller, forks inside, time limits,
the ``auto`` policy. Counts what is in flight instead of timing anything."""

from __future__ import annotations

import threading
import time

import pytest

import sglrun as sgl
from sglrun.backends.fake import FakeBackend
from sglrun.batch.readers import Row
from sglrun.batch.runner import run_batch_file
from sglrun.lang.backend import Backend, GenerateResult
from sglrun.lang.ir import SamplingParams
from sglrun.lang.scheduler import DEFAULT_CONCURRENCY, Scheduler, auto_concurrency


class Gate(Backend):
    """Answers every row at once except those whose prompt names a held topic: they wait for
    ``release``. Counts calls in flight and answers given (a blocking backend: on workers)."""

    name = "gate"

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0

    def generate(self, request, on_chunk=None):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if any(f"topic {name}." in request.prompt for name in self.held):
                assert self.release.wait(30), "the gate was never released"
            else:
                time.sleep(0.005)  # long enough for the slots to overlap
            return GenerateResult("ok", {"completion_tokens": 1})
        finally:
            with self.lock:
                self.in_flight -= 1
                self.answered += 1


@sgl.function
def one_gen(s, topic: str):
    s += f"About topic {topic}." + sgl.gen("out", max_tokens=2)


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_slow_first_row_does_not_stop_later_rows_from_starting():
    backend = Gate({"t0"})
    rows = [{"topic": f"t{i}"} for i in range(200)]
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(one_gen.run_batch(rows, backend=backend, num_threads=8))
    )
    worker.start()
    try:
        # Row 0 holds its slot; the other seven slots keep turning over: every other row runs.
        assert wait_until(lambda: backend.answered == 199), backend.answered
        assert backend.in_flight == 1 and backend.max_in_flight == 8
    finally:
        backend.release.set()
        worker.join(30)
    states = result[0]
    assert [s["out"] for s in states] == ["ok"] * 200  # and in input order


def test_sglrun_batch_writes_in_order_while_a_slow_row_runs():
    backend = Gate({"t0"})
    written: list[dict] = []
    rows = [Row(i, i + 1, str(i), {"topic": f"t{i}"}) for i in range(100)]
    done: list = []
    worker = threading.Thread(target=lambda: done.append(run_batch_file(
        one_gen, rows, backend=backend, defaults=SamplingParams.defaults(), num_threads=4,
        on_record=written.append,
    )))  # fmt: skip
    worker.start()
    try:
        assert wait_until(lambda: backend.answered == 99), backend.answered
        assert written == []  # held back behind row 0, which is still running
    finally:
        backend.release.set()
        worker.join(30)
    assert [r["id"] for r in written] == [str(i) for i in range(100)]
    assert done[0].ok == 100


def test_unordered_output_does_not_wait_for_the_slow_row():
    backend = Gate({"t0"})
    written: list[dict] = []
    rows = [Row(i, i + 1, str(i), {"topic": f"t{i}"}) for i in range(50)]
    worker = threading.Thread(target=lambda: run_batch_file(
        one_gen, rows, backend=backend, defaults=SamplingParams.defaults(), num_threads=4,
        on_record=written.append, ordered=False,
    ))  # fmt: skip
    worker.start()
    try:
        assert wait_until(lambda: len(written) == 49), len(written)
    finally:
        backend.release.set()
        worker.join(30)
    assert written[-1]["id"] == "0" and len(written) == 50


@sgl.function
def fan_out(s, topic: str):
    s += f"About topic {topic}."
    forks = s.fork(3)
    for index, fork in enumerate(forks):
        fork += f" angle {index} " + sgl.gen("angle", max_tokens=2)
    forks.join()


def test_forks_run_under_the_scheduler_and_finish_with_their_program():
    backend = FakeBackend(["x"], cycle=True, delay=0.01)
    states = fan_out.run_batch([{"topic": f"t{i}"} for i in range(12)], backend=backend,
                               num_threads=4)
    assert all(s["angle"] == ["x", "x", "x"] for s in states)
    assert backend.max_in_flight > 4  # forks of programs in flight ran at the same time
    assert backend.in_flight == 0


@sgl.function
def spins(s, topic: str):
    s += topic
    if topic == "stuck":
        while True:  # a program stuck in pure Python: never parks, never returns
            pass
    s += sgl.gen("out", max_tokens=2)


def test_a_row_stuck_computing_times_out_and_the_batch_goes_on():
    written: list[dict] = []
    rows = [Row(i, i + 1, str(i), {"topic": "stuck" if i == 3 else f"t{i}"}) for i in range(20)]
    stats = run_batch_file(
        spins, rows, backend=FakeBackend(["ok"], cycle=True), defaults=SamplingParams.defaults(),
        num_threads=4, on_record=written.append, row_timeout=0.5,
    )  # fmt: skip
    assert [r["id"] for r in written] == [str(i) for i in range(20)]
    assert written[3]["error"]["type"] == "RowTimeout"
    assert all(r["error"] is None for i, r in enumerate(written) if i != 3)
    assert stats.timed_out == 1 and stats.failed == 1 and stats.ok == 19


@sgl.function
def waits_on_a_fork(s, topic: str):
    forks = s.fork(2)
    forks += f"about topic {topic}." + sgl.gen("part", max_tokens=2)
    s += "joined: " + forks[0]["part"]


def test_a_row_parked_on_the_model_times_out_with_its_forks():
    backend = Gate({"slow"})
    written: list[dict] = []
    rows = [Row(i, i + 1, str(i), {"topic": "slow" if i == 1 else f"t{i}"}) for i in range(6)]
    try:
        stats = run_batch_file(
            waits_on_a_fork, rows, backend=backend, defaults=SamplingParams.defaults(),
            num_threads=3, on_record=written.append, row_timeout=0.5,
        )  # fmt: skip
    finally:
        backend.release.set()
    assert written[1]["error"]["type"] == "RowTimeout"
    assert [r["error"] for i, r in enumerate(written) if i != 1] == [None] * 5
    assert stats.timed_out == 1


def test_the_auto_policy_asks_the_backend():
    class Advertised(FakeBackend):
        def concurrency_hint(self):
            return 12

    class Broken(FakeBackend):
        def concurrency_hint(self):
            raise ConnectionError("no server info")

    assert auto_concurrency(FakeBackend()) == DEFAULT_CONCURRENCY
    assert auto_concurrency(Advertised()) == 12
    assert auto_concurrency(Advertised(), rows=5) == 5
    assert auto_concurrency(Broken()) == DEFAULT_CONCURRENCY
    backend = Advertised(["x"], cycle=True, delay=0.02)
    one_gen.run_batch([{"topic": f"t{i}"} for i in range(60)], backend=backend)
    assert backend.max_in_flight == 12  # run_batch(num_threads="auto") used the hint


def test_scheduler_rejects_a_bad_concurrency():
    with pytest.raises(ValueError):
        Scheduler(0)


def test_the_feed_reads_ahead_in_halves_and_tells_the_hub_only_when_it_waits():
    from sglrun.lang.scheduler import EMPTY, Feed

    drawn = []
    release = threading.Event()

    def source():
        for index in range(40):
            if index == 30:
                release.wait(10)  # a slow source: the hub finds nothing waiting
            drawn.append(index)
            yield index

    notified = []
    feed = Feed(source(), capacity=8)
    feed.start(lambda: notified.append(len(drawn)))
    assert wait_until(lambda: len(drawn) == 8)
    taken = [feed.poll() for _ in range(3)]  # 5 left: above half, the reader stays asleep
    time.sleep(0.1)
    assert len(drawn) == 8 and notified == []
    taken.append(feed.poll())  # 4 left: half, the reader fills up again
    assert wait_until(lambda: len(drawn) == 12)
    while len(taken) < 30:
        item = feed.poll()
        if item is not EMPTY:
            taken.append(item)
    assert feed.poll() is EMPTY  # the hub waits: the next item tells it
    told = len(notified)  # (only after the polls that found nothing, never per item)
    assert told < 30
    release.set()
    assert wait_until(lambda: len(notified) > told)
    while True:
        try:
            item = feed.poll()
        except StopIteration:
            break
        if item is not EMPTY:
            taken.append(item)
    assert taken == list(range(40))
