"""The batch runner on the FakeBackend: records, errors, order, bounded memory, interrupts."""

from __future__ import annotations

import gc
import json
import random
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

import sglrun as sgl
from sglrun.backends.fake import FakeBackend
from sglrun.batch.readers import Row
from sglrun.batch.runner import count_tokens, error_info, run_batch_file, token_counts
from sglrun.batch.writers import RecordWriter
from sglrun.errors import (
    InputError,
    InvalidArgumentError,
    TransportError,
    VariableNotProducedError,
)
from sglrun.lang.backend import GenerateResult
from sglrun.lang.ir import SamplingParams


@sgl.function
def echo(s, question: str, times: int = 1):
    s += "Q: " + question * times + "\n"
    s += "A:" + sgl.gen("answer", max_tokens=8)


@sgl.function
def picky(s, question: str):
    if question == "boom":
        raise ValueError("no booms\nplease")
    s += "A:" + sgl.gen("answer", max_tokens=8)


def rows_of(items: list[dict], *, ids: bool = False) -> list[Row]:
    return [
        Row(index, index + 1, str(item.get("id", index)) if ids else str(index), item)
        for index, item in enumerate(items)
    ]


def run(program, rows, backend=None, **kwargs):
    records: list[dict] = []
    options = dict(num_threads=4, defaults=SamplingParams.defaults())
    options.update(kwargs)
    stats = run_batch_file(
        program,
        rows,
        backend=backend or FakeBackend(["hello world"], cycle=True),
        on_record=records.append,
        **options,
    )
    return stats, records


# ----------------------------------------------------------------------------- records


def test_every_row_gives_one_record_in_input_order_with_counters():
    rows = rows_of([{"question": f"q{i}", "times": str(i % 3 + 1)} for i in range(30)])
    stats, records = run(echo, rows)
    assert [r["id"] for r in records] == [str(i) for i in range(30)]
    assert records[0] == {"id": "0", "vars": {"answer": "hello world"}, "error": None}
    assert stats.status == "completed"
    assert (stats.done, stats.ok, stats.failed, stats.read) == (30, 30, 0, 30)
    assert stats.tokens == 60  # two words per reply
    assert stats.elapsed > 0 and stats.rows_per_second > 0


def test_annotations_convert_row_values():
    backend = FakeBackend(lambda request: request.prompt.split("\n")[0])
    stats, records = run(echo, rows_of([{"question": "ab", "times": "3"}]), backend)
    assert records[0]["vars"]["answer"] == "Q: ababab"


def test_bad_rows_become_error_records_and_good_rows_still_run():
    rows = [
        Row(0, 1, "0", {"question": "fine"}),
        Row(1, 2, "1", None, InputError("in.jsonl:2: not valid JSON (Expecting value)")),
        Row(2, 3, "2", {"question": "x", "times": "many"}),
        Row(3, 4, "3", {"nothing": 1}),
        Row(4, 5, "4", {"question": "also fine"}),
    ]
    stats, records = run(echo, rows, source="in.jsonl")
    assert [r["error"] is None for r in records] == [True, False, False, False, True]
    assert records[1]["error"] == {
        "type": "InputError",
        "message": "in.jsonl:2: not valid JSON (Expecting value)",
    }
    assert records[2]["error"]["type"] == "InputError"
    assert (
        "in.jsonl:3" in records[2]["error"]["message"]
        and "'times'" in records[2]["error"]["message"]
    )
    assert "missing required" in records[3]["error"]["message"]
    assert (stats.ok, stats.failed) == (2, 3)


def test_program_errors_are_recorded_on_one_line():
    stats, records = run(picky, rows_of([{"question": "a"}, {"question": "boom"}]))
    assert records[1]["error"] == {"type": "ValueError", "message": "no booms please"}
    assert records[1]["vars"] == {}
    assert stats.failed == 1 and stats.ok == 1


def test_backend_failure_is_reported_as_the_cause():
    @sgl.function
    def reads_back(s, question: str):
        s += sgl.gen("answer", max_tokens=4)
        s += "seen: " + s["answer"]

    backend = FakeBackend([TransportError("connection refused by 10.0.0.1")])
    _, records = run(reads_back, rows_of([{"question": "a"}]), backend)
    assert records[0]["error"] == {
        "type": "TransportError",
        "message": "connection refused by 10.0.0.1",
    }


def test_error_info_unwraps_variable_not_produced():
    cause = TransportError("timed out")
    assert error_info(VariableNotProducedError("x", cause)) == {
        "type": "TransportError",
        "message": "timed out",
    }
    plain = error_info(VariableNotProducedError("x"))
    assert plain["type"] == "VariableNotProducedError" and "'x'" in plain["message"]
    assert error_info(None) is None
    assert error_info(RuntimeError()) == {"type": "RuntimeError", "message": "RuntimeError"}
    assert len(error_info(RuntimeError("x" * 10_000))["message"]) <= 2000


def test_count_tokens_handles_forks_and_missing_counts():
    meta = {
        "a": {"completion_tokens": 3},
        "b": [{"completion_tokens": 2}, {"completion_tokens": 4}],
        "c": {"finish_reason": "stop"},
        "d": "not a dict",
        "e": {"completion_tokens": True, "prompt_tokens": [5, False, 6]},
    }
    assert count_tokens(meta) == 9
    assert token_counts(meta) == [9, 11]


def test_include_adds_opt_in_fields():
    stats, records = run(
        echo,
        rows_of([{"question": "hi", "extra": 1}]),
        include={"input", "text", "messages", "meta"},
    )
    record = records[0]
    assert record["input"] == {"question": "hi", "extra": 1}
    assert record["text"] == "Q: hi\nA:hello world"
    assert record["messages"] == []
    assert record["meta"]["answer"]["completion_tokens"] == 2
    with pytest.raises(InvalidArgumentError, match="unknown include"):
        run(echo, rows_of([{"question": "hi"}]), include={"everything"})


def test_mapping_and_strict():
    rows = rows_of([{"q": "hi", "id": "r1"}, {"q": "yo", "id": "r2", "junk": 1}], ids=True)
    _, records = run(echo, rows, mapping={"question": "q"}, strict=True, id_field="id")
    assert [r["id"] for r in records] == ["r1", "r2"]
    assert records[0]["error"] is None
    assert "unknown column" in records[1]["error"]["message"]


def test_num_threads_is_checked():
    with pytest.raises(InvalidArgumentError):
        run(echo, rows_of([{"question": "a"}]), num_threads=0)


# ----------------------------------------------------------------------------- order, memory


def slow_random(request):
    time.sleep(random.uniform(0, 0.01))
    return request.prompt.split("\n")[0]


def test_ordered_output_despite_random_finishing_order():
    rows = rows_of([{"question": f"q{i}"} for i in range(60)])
    _, records = run(echo, rows, FakeBackend(slow_random), num_threads=8, window=4)
    assert [r["id"] for r in records] == [str(i) for i in range(60)]
    assert [r["vars"]["answer"] for r in records] == [f"Q: q{i}" for i in range(60)]


def test_unordered_output_has_every_row_once():
    rows = rows_of([{"question": f"q{i}"} for i in range(60)])
    _, records = run(echo, rows, FakeBackend(slow_random), num_threads=8, ordered=False)
    assert sorted(int(r["id"]) for r in records) == list(range(60))


def test_rows_are_read_lazily_with_at_most_two_per_thread_in_flight():
    pulled = 0
    written = 0
    worst = 0
    lock = threading.Lock()

    def source() -> Iterator[Row]:
        nonlocal pulled, worst
        for index in range(200):
            with lock:
                pulled += 1
                worst = max(worst, pulled - written)
            yield Row(index, index + 1, str(index), {"question": "q"})

    def write(record: dict) -> None:
        nonlocal written
        with lock:
            written += 1

    backend = FakeBackend(["x"], cycle=True, delay=0.002)
    stats = run_batch_file(
        echo,
        source(),
        backend=backend,
        defaults=SamplingParams.defaults(),
        num_threads=3,
        ordered=False,
        on_record=write,
    )
    assert stats.done == 200 and written == 200
    assert worst <= 3 * 2
    assert backend.max_in_flight <= 3


class Recorder:
    """A stream panel that keeps weak references to every state it saw."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.live: set[int] = set()
        self.texts: list[str] = []
        self.lock = threading.Lock()

    def track(self, key, label, state):
        with self.lock:
            self.refs.append(weakref.ref(state))
            self.live.add(key)

    def untrack(self, key):
        with self.lock:
            self.live.discard(key)


def test_states_are_released_after_their_record_is_written():
    panel = Recorder()
    rows = rows_of([{"question": f"q{i}"} for i in range(50)])
    stats, records = run(echo, rows, stream_panel=panel)
    assert len(records) == 50 and len(panel.refs) == 50
    assert panel.live == set()
    gc.collect()
    assert all(ref() is None for ref in panel.refs)


class SlowStreamer(FakeBackend):
    """Streams three pieces with a pause between them, like a model would."""

    def generate(self, request, on_chunk=None):
        for piece in ("one ", "two ", "three"):
            if on_chunk is not None:
                on_chunk(piece)
            time.sleep(0.05)
        return GenerateResult("one two three", {"completion_tokens": 3})


def test_stream_panel_sees_text_arrive_chunk_by_chunk():
    snapshots: list[str] = []

    class Poller(Recorder):
        def track(self, key, label, state):
            super().track(key, label, state)
            assert state.executor.stream

            def poll():
                while key in self.live:
                    text = state.text_so_far()
                    if not snapshots or snapshots[-1] != text:
                        snapshots.append(text)
                    time.sleep(0.005)

            threading.Thread(target=poll, daemon=True).start()

    panel = Poller()
    stats, records = run(echo, rows_of([{"question": "q"}]), SlowStreamer(), stream_panel=panel)
    assert records[0]["vars"]["answer"] == "one two three"
    assert stats.tokens == 3
    partial = [text for text in snapshots if text.startswith("Q: q\nA:one") and "three" not in text]
    assert partial, snapshots


# ----------------------------------------------------------------------------- resume, stop


def test_skip_ids_are_not_run():
    backend = FakeBackend(["x"], cycle=True)
    rows = rows_of([{"question": f"q{i}"} for i in range(10)])
    stats, records = run(echo, rows, backend, skip_ids={"1", "2", "7"})
    assert [r["id"] for r in records] == ["0", "3", "4", "5", "6", "8", "9"]
    assert stats.skipped == 3 and stats.done == 7
    assert len(backend.calls) == 7


def test_stop_event_stops_taking_rows_and_finishes_rows_in_flight():
    stop = threading.Event()
    records: list[dict] = []

    def write(record):
        records.append(record)
        if len(records) == 5:
            stop.set()

    stats = run_batch_file(
        echo,
        rows_of([{"question": f"q{i}"} for i in range(500)]),
        backend=FakeBackend(["x"], cycle=True, delay=0.01),
        defaults=SamplingParams.defaults(),
        num_threads=2,
        on_record=write,
        stop_event=stop,
    )
    assert stats.status == "interrupted"
    assert 5 <= len(records) < 20
    assert [r["id"] for r in records] == [str(i) for i in range(len(records))]
    assert stats.abandoned == 0


def test_keyboard_interrupt_while_reading_is_an_interrupt():
    def source():
        for index in range(100):
            if index == 6:
                raise KeyboardInterrupt
            yield Row(index, index + 1, str(index), {"question": "q"})

    stats, records = run(echo, source())
    assert stats.status == "interrupted"
    # rows already running finish; rows taken but not started are left for a resume
    assert len(records) <= 6
    assert [r["id"] for r in records] == [str(i) for i in range(len(records))]


def test_rows_still_running_after_the_grace_are_abandoned():
    stop = threading.Event()
    backend = FakeBackend(["x"], cycle=True, delay=2.0)
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()
    stats, records = run(
        echo, rows_of([{"question": "q"}] * 10), backend, num_threads=2, stop_event=stop, grace=0.2
    )
    assert time.monotonic() - started < 1.5
    assert stats.status == "interrupted" and records == []
    assert stats.abandoned == 2


def test_a_broken_output_stops_the_batch():
    def write(record):
        raise BrokenPipeError("closed")

    stats = run_batch_file(
        echo,
        rows_of([{"question": "q"}] * 200),
        backend=FakeBackend(["x"], cycle=True),
        defaults=SamplingParams.defaults(),
        num_threads=2,
        on_record=write,
    )
    assert stats.status == "write_error"
    assert isinstance(stats.write_error, BrokenPipeError)
    assert stats.read < 200


def test_input_breaking_mid_way_keeps_the_rows_before_it():
    def source():
        yield Row(0, 1, "0", {"question": "q"})
        yield Row(1, 2, "1", {"question": "q"})
        raise InputError("in.csv:3: CSV header repeats the column 'a'")

    stats, records = run(echo, source())
    assert [r["id"] for r in records] == ["0", "1"]
    assert stats.status == "read_error"
    assert "repeats" in str(stats.read_error)


def test_unknown_keys_are_warned_about_once_each():
    warnings: list[str] = []
    rows = rows_of(
        [{"question": "a", "extra": 1}, {"question": "b", "extra": 2, "id": "x"}] * 3, ids=False
    )
    stats, records = run(echo, rows, on_warning=warnings.append, source="in.jsonl")
    assert stats.ok == 6
    assert len(warnings) == 2
    assert warnings[0].startswith("in.jsonl:1: key 'extra' fills no parameter of echo")
    assert "--id-field" in warnings[1]
    warnings.clear()
    run(echo, rows, on_warning=warnings.append, id_field="id", mapping={"times": "extra"})
    assert warnings == []
    warnings.clear()
    stats, _ = run(echo, rows, on_warning=warnings.append, strict=True)
    assert warnings == [] and stats.failed == 6


def test_progress_callback_sees_every_row():
    calls: list[int] = []
    stats, _ = run(
        echo,
        rows_of([{"question": "q"}] * 12),
        on_progress=lambda s: calls.append(s.done + s.skipped),
        skip_ids={"0"},
    )
    assert len(calls) == 12 and max(calls) == 12


def test_stream_mode_reading_a_missing_variable_is_an_error_not_a_hang():
    @sgl.function
    def reads_missing(s, question: str):
        s += sgl.gen("answer", max_tokens=4)
        s += s["never_made"]

    _, records = run(reads_missing, rows_of([{"question": "q"}]), stream_panel=Recorder())
    assert records[0]["error"]["type"] == "VariableNotProducedError"
    assert "never_made" in records[0]["error"]["message"]


# ----------------------------------------------------------------------------- hub or threads


def where_backend(**options) -> FakeBackend:
    """Replies with where the backend was called: on a hub task or not, and the thread."""
    from sglrun.lang.hub import current_hub

    def reply(request):
        task = "hub" if current_hub() is not None else "nohub"
        return f"{task}:{threading.current_thread().name}"

    return FakeBackend(reply, **options)


def test_rows_on_a_cooperative_backend_run_as_tasks_of_one_hub_thread():
    stats, records = run(echo, rows_of([{"question": f"q{i}"} for i in range(40)]),
                         where_backend(), num_threads=8)
    assert stats.ok == 40
    assert {r["vars"]["answer"] for r in records} == {"hub:sglrun-io"}  # one hub thread


def test_rows_on_a_blocking_backend_call_it_on_worker_threads():
    stats, records = run(echo, rows_of([{"question": f"q{i}"} for i in range(6)]),
                         where_backend(delay=0.01), num_threads=3)
    assert stats.ok == 6
    assert all(r["vars"]["answer"].startswith("nohub:sglrun-hub") for r in records)


@sgl.function
def tool_user(s, question: str):
    time.sleep(0.15)  # a program's own blocking call (a tool, a lookup) holds the hub
    s += "A:" + sgl.gen("answer", max_tokens=8)


def test_rows_that_block_the_hub_move_to_worker_threads(caplog):
    import logging

    caplog.set_level(logging.WARNING)
    stats, records = run(tool_user, rows_of([{"question": f"q{i}"} for i in range(30)]),
                         where_backend(), num_threads=8)
    assert stats.ok == 30 and [r["id"] for r in records] == [str(i) for i in range(30)]
    places = [r["vars"]["answer"] for r in records]
    assert places[0] == "hub:sglrun-io" and any(p.startswith("hub:sglrun-row") for p in places)
    assert any("blocked" in record.getMessage() for record in caplog.records)


def test_the_collector_threshold_is_back_after_a_run():
    before = gc.get_threshold()
    stats, _ = run(echo, rows_of([{"question": "q"}] * 5))
    assert stats.ok == 5 and gc.get_threshold() == before


def test_records_are_flushed_once_every_finished_row_is_handed_over(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(str(path), append=False, flush_each=False)
    flushed: list[int] = []  # records on disk at each flush

    def flush():
        writer.flush()
        flushed.append(len(path.read_text().splitlines()))

    stats = run_batch_file(
        echo,
        rows_of([{"question": f"q{i}"} for i in range(300)]),
        backend=FakeBackend(["x"], cycle=True),
        defaults=SamplingParams.defaults(),
        num_threads=8,
        on_record=writer.write,
        flush=flush,
    )
    writer.close()
    assert stats.status == "completed"
    assert flushed and flushed[-1] == 300  # the last flush holds every record
    assert len(flushed) < 300  # in bursts, not one flush per record
    assert [r["id"] for r in map(json.loads, path.read_text().splitlines())] == [
        str(i) for i in range(300)
    ]


def test_a_flush_that_fails_stops_the_batch_as_a_failed_write_does():
    def flush():
        raise BrokenPipeError("closed")

    stats = run_batch_file(
        echo,
        rows_of([{"question": "q"}] * 2000),
        backend=FakeBackend(["x"], cycle=True),
        defaults=SamplingParams.defaults(),
        num_threads=2,
        on_record=lambda record: None,
        flush=flush,
    )
    assert stats.status == "write_error"
    assert isinstance(stats.write_error, BrokenPipeError)
    assert stats.read < 2000


@sgl.function
def open_ended(s, question: str, **extra):
    s += question + repr(sorted(extra.items())) + sgl.gen("answer")


def test_a_program_with_kwargs_gets_the_columns_no_parameter_takes():
    rows = rows_of([{"question": "q", "lang": "fr", "n": 2}, {"question": "r"}])
    for strict in (False, True):  # --strict: no column is left over, kwargs takes them
        stats, records = run(open_ended, rows, include=("text",), strict=strict)
        assert stats.failed == 0
        assert [r["text"] for r in records] == [
            "q[('lang', 'fr'), ('n', 2)]hello world",
            "r[]hello world",
        ]
