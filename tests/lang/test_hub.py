"""The hub: programs as greenlets on one thread, parking on waits, batching what they gather;
and ``run_batch`` on it (cooperative backends) or on threads (the others)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import pytest

import sglrun as sgl
from sglrun.backends.fake import FakeBackend
from sglrun.lang.hub import Hub, current_hub


class Recorder:
    """A Batcher that answers each item upper-cased and records the batches it was sent."""

    def __init__(self, max_batch: int = 256, max_in_flight: int = 2, fail: bool = False):
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.fail = fail
        self.batches: list[list[list[str]]] = []
        self.threads: set[int] = set()

    def send_together(self, groups):
        self.batches.append([list(group) for group in groups])
        self.threads.add(threading.get_ident())
        if self.fail:
            raise ConnectionError("the server went away")
        return [[item.upper() for item in group] for group in groups]


def test_tasks_run_in_the_callers_thread_and_join_gives_results_and_errors():
    hub = Hub(4)
    seen: list[Any] = []

    def work(value: int) -> int:
        seen.append((value, threading.get_ident(), current_hub() is hub))
        if value == 3:
            raise ValueError("three")
        return value * 10

    tasks = [hub.spawn(work, value) for value in range(5)]
    assert [hub.join(task) for task in tasks[:3]] == [0, 10, 20]
    with pytest.raises(ValueError, match="three"):
        hub.join(tasks[3])
    assert hub.join(tasks[4]) == 40
    assert seen == [(v, threading.get_ident(), True) for v in range(5)]
    assert current_hub() is None and hub.live == 0
    hub.close()


def test_call_blocking_runs_on_a_worker_while_other_tasks_go_on():
    hub = Hub(4)
    order: list[str] = []

    def slow() -> int:
        order.append("slow starts")
        thread = hub.call_blocking(lambda: (time.sleep(0.2), threading.get_ident())[1])
        order.append("slow ends")
        return thread

    def quick() -> None:
        order.append("quick")

    first, second = hub.spawn(slow), hub.spawn(quick)
    worker_thread = hub.join(first)
    hub.join(second)
    assert worker_thread != threading.get_ident()
    assert order == ["slow starts", "quick", "slow ends"]
    hub.close()


def test_call_blocking_raises_the_workers_error_in_the_task():
    hub = Hub(2)

    def boom() -> None:
        raise KeyError("gone")

    task = hub.spawn(lambda: hub.call_blocking(boom))
    with pytest.raises(KeyError, match="gone"):
        hub.join(task)
    hub.close()


def test_gather_sends_many_tasks_items_together_and_each_gets_its_own():
    hub = Hub(4)
    batcher = Recorder(max_batch=8)
    tasks = [hub.spawn(hub.gather, batcher, [f"t{i}", f"u{i}"]) for i in range(20)]
    results = [hub.join(task) for task in tasks]
    assert results == [[f"T{i}", f"U{i}"] for i in range(20)]
    assert len(batcher.batches) < 20  # shared requests, not one per task
    assert all(sum(len(g) for g in batch) <= 8 for batch in batcher.batches)
    assert threading.get_ident() not in batcher.threads  # sent from worker threads
    hub.close()


def test_a_batcher_on_the_hubs_thread_may_wait_until_every_runnable_task_gathered():
    """``send_when_idle`` (the call cache): one batch for all the tasks that could run, where
    the goal of half the live tasks splits them."""
    sizes = {}
    for when_idle in (False, True):
        hub = Hub(4)
        batcher = Recorder()
        batcher.cooperative = True  # type: ignore[attr-defined]
        batcher.send_when_idle = when_idle  # type: ignore[attr-defined]
        tasks = [hub.spawn(hub.gather, batcher, [f"t{i}"]) for i in range(40)]
        assert [hub.join(task) for task in tasks] == [[f"T{i}"] for i in range(40)]
        assert batcher.threads == {threading.get_ident()}  # sent by a task of the hub
        sizes[when_idle] = [len(batch) for batch in batcher.batches]
        hub.close()
    assert sizes[True] == [40]
    assert len(sizes[False]) > 1 and sum(sizes[False]) == 40


class SlowFirst(Recorder):
    """A Recorder whose first batch takes ``delay`` seconds to come back."""

    def __init__(self, delay: float) -> None:
        super().__init__(max_in_flight=4)
        self.delay = delay
        self.sent_at: list[float] = []

    def send_together(self, groups):
        self.sent_at.append(time.monotonic())
        if len(self.sent_at) == 1:
            time.sleep(self.delay)
        return super().send_together(groups)


def test_a_small_batch_waits_briefly_for_the_one_out_but_never_for_a_slow_one():
    """While a batch is out the hub holds a small one back (it may grow), but at most
    HOLD_LIMIT: the second task's lone item is not stuck behind a slow first answer."""
    from sglrun.lang.batching import HOLD_LIMIT

    hub = Hub(4)
    batcher = SlowFirst(delay=1.0)
    started = time.monotonic()
    first = hub.spawn(hub.gather, batcher, ["slow"])

    def later() -> list[str]:
        hub.call_blocking(time.sleep, 0.05)  # arrives while the first batch is out
        return hub.gather(batcher, ["quick"])

    second = hub.spawn(later)
    assert hub.join(second) == ["QUICK"]
    assert time.monotonic() - started < 0.5  # not held for the slow one's second
    assert len(batcher.sent_at) == 2
    assert batcher.sent_at[1] - batcher.sent_at[0] >= HOLD_LIMIT
    assert hub.join(first) == ["SLOW"]
    hub.close()


def test_a_failed_batch_reaches_every_task_in_it():
    hub = Hub(2)
    batcher = Recorder(fail=True)
    tasks = [hub.spawn(hub.gather, batcher, [f"t{i}"]) for i in range(5)]
    for task in tasks:
        with pytest.raises(ConnectionError):
            hub.join(task)
    hub.close()


def test_blocking_in_a_tasks_own_code_is_reported_but_computing_is_not():
    reports: list[float] = []
    hub = Hub(2, on_slow=reports.append)

    def compute() -> int:
        deadline = time.thread_time() + 0.3
        total = 0
        while time.thread_time() < deadline:
            total += 1
        return total

    hub.join(hub.spawn(compute))
    assert reports == []
    for _ in range(4):
        hub.join(hub.spawn(time.sleep, 0.2))
    assert len(reports) == 1 and reports[0] > 0.5
    hub.close()


# ----------------------------------------------------------------- run_batch on the hub
@sgl.function
def two_gens(s, topic):
    s += "Topic: " + topic + "\n"
    s += "A:" + sgl.gen("a", max_tokens=4)
    s += "\nB:" + sgl.gen("b", max_tokens=4)


def echo_backend(**options: Any) -> FakeBackend:
    """Each reply names the topic and whether the program ran as a hub task."""

    def reply(request):
        where = "hub" if current_hub() is not None else threading.current_thread().name
        return f"{request.name}:{request.prompt.split(chr(10))[0][7:]}:{where}"

    return FakeBackend(reply, **options)


def test_run_batch_on_a_cooperative_backend_runs_programs_as_hub_tasks():
    states = two_gens.run_batch([{"topic": f"t{i}"} for i in range(30)], backend=echo_backend())
    assert [s["a"] for s in states] == [f"a:t{i}:hub" for i in range(30)]
    assert [s["b"] for s in states] == [f"b:t{i}:hub" for i in range(30)]


def test_run_batch_on_a_blocking_backend_calls_it_on_worker_threads():
    backend = echo_backend(delay=0.01)  # a delay sleeps: not cooperative
    states = two_gens.run_batch([{"topic": f"t{i}"} for i in range(6)], backend=backend)
    assert all(s["a"].startswith(f"a:t{i}:sglrun-hub") for i, s in enumerate(states))
    assert backend.max_in_flight > 1  # the programs waited on the engine at the same time


def test_generator_style_yields_in_order_on_the_hub():
    rows = [{"topic": f"t{i}"} for i in range(12)]
    states = two_gens.run_batch(rows, backend=echo_backend(), generator_style=True)
    assert not isinstance(states, list)
    assert [s["a"] for s in states] == [f"a:t{i}:hub" for i in range(12)]


@sgl.function
def threshold_reader(s):
    s += str(gc.get_threshold()[0])


def test_the_collector_runs_less_often_during_a_batch_and_is_restored_after():
    before = gc.get_threshold()
    states = threshold_reader.run_batch([{}, {}], backend=echo_backend())
    assert all(int(state.text()) >= 20_000 for state in states)
    assert gc.get_threshold() == before


@sgl.function
def fanned(s, topic):
    s += "Topic: " + topic + "\n"
    forks = s.fork(3)
    for index, fork in enumerate(forks):
        fork += f"Angle {index}:" + sgl.gen("angle", max_tokens=4)
    s += "Angles: " + ", ".join(fork["angle"] for fork in forks)


def test_forks_of_hub_programs_are_tasks_of_the_same_hub():
    states = fanned.run_batch([{"topic": f"t{i}"} for i in range(8)], backend=echo_backend())
    for i, state in enumerate(states):
        assert state.error() is None
        assert state.text().endswith(", ".join([f"angle:t{i}:hub"] * 3))


@sgl.function
def unjoined(s, topic):
    s += topic
    forks = s.fork(2)
    forks += sgl.gen("late", max_tokens=4)


def test_forks_a_program_never_reads_are_finished_before_run_batch_returns():
    states = unjoined.run_batch([{"topic": f"t{i}"} for i in range(4)], backend=echo_backend())
    assert all(s.error() is None for s in states)


@sgl.function
def outer(s, count):
    inner = two_gens.run_batch([{"topic": f"in{i}"} for i in range(count)])
    s += "|".join(state["a"] for state in inner)


def test_a_batch_inside_a_hub_program_shares_the_hub(monkeypatch):
    from sglrun.lang.global_config import global_config

    monkeypatch.setattr(global_config, "default_backend", echo_backend())
    states = outer.run_batch([{"count": 2}, {"count": 3}])
    assert states[0].text() == "a:in0:hub|a:in1:hub"
    assert states[1].text() == "a:in0:hub|a:in1:hub|a:in2:hub"


@sgl.function
def sleepy(s, topic):
    time.sleep(0.15)  # the program's own blocking work, say a tool call
    s += topic + threading.current_thread().name


def test_programs_that_block_the_hub_move_to_threads(caplog):
    caplog.set_level(logging.WARNING, logger="sglrun.lang")
    rows = [{"topic": f"t{i};"} for i in range(24)]
    states = sleepy.run_batch(rows, backend=echo_backend(), num_threads=8)
    assert [s.text().split(";")[0] for s in states] == [f"t{i}" for i in range(24)]
    on_threads = [s for s in states if "sglrun-row" in s.text()]
    assert on_threads, "no row left the hub"
    assert any("blocked" in record.getMessage() for record in caplog.records)


def test_workers_stay_counted_right_after_a_backlog_and_an_idle_timeout(monkeypatch):
    """More jobs than workers at once, then the workers end idle: a later job still runs
    (the books once showed phantom idle workers, and such a job waited forever)."""
    from sglrun.lang import hub as hub_module

    monkeypatch.setattr(hub_module, "WORKER_IDLE", 0.05)
    workers = hub_module._Workers(2, "test-workers")
    done = threading.Semaphore(0)
    for _ in range(10):  # 8 of them wait for one of the 2 workers
        workers.submit(lambda: (time.sleep(0.01), done.release()))
    for _ in range(10):
        assert done.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while workers._threads and time.monotonic() < deadline:
        time.sleep(0.02)  # both end on their idle timeout
    assert workers._threads == 0 and workers._idle == 0
    workers.submit(done.release)
    assert done.acquire(timeout=5)
