"""Writing batch output: JSON lines, ordering with a bounded window, the record schema."""

from __future__ import annotations

import datetime
import io
import json
import random
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from sglrun.batch.writers import (
    OrderedEmitter,
    RecordWriter,
    check_writable,
    make_record,
    to_jsonable,
)
from sglrun.errors import InputError, InvalidArgumentError


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- RecordWriter


def test_writer_writes_one_flushed_line_per_record(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(str(path), append=False)
    writer.write({"id": "0", "vars": {"a": "é"}, "error": None})
    # flushed before close: another reader already sees the complete line
    assert path.read_bytes() == '{"id":"0","vars":{"a":"é"},"error":null}\n'.encode()
    writer.write({"id": "1", "when": datetime.date(2024, 1, 2), "big": 2**70})
    writer.close()
    records = read_jsonl(path)
    assert records[1] == {"id": "1", "when": "2024-01-02", "big": 2**70}
    assert writer.count == 2


def test_writer_append_and_truncate(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "old"}\n')
    with RecordWriter(str(path), append=True, fsync=True) as writer:
        writer.write({"id": "new"})
    assert [r["id"] for r in read_jsonl(path)] == ["old", "new"]
    with RecordWriter(str(path), append=False) as writer:
        writer.write({"id": "only"})
    assert [r["id"] for r in read_jsonl(path)] == ["only"]


def test_writer_stdout_uses_binary_buffer_and_stays_open(monkeypatch):
    buffer = io.BytesIO()
    fake = io.TextIOWrapper(buffer, encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", fake)
    writer = RecordWriter("-", append=False)
    writer.write({"id": "x"})
    writer.close()
    assert buffer.getvalue() == b'{"id":"x"}\n'
    assert not buffer.closed


def test_writer_threads_never_interleave_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(str(path), append=False)
    payload = "z" * 20000

    def work(start: int) -> None:
        for i in range(start, start + 50):
            writer.write({"id": str(i), "vars": {"p": payload}})

    threads = [threading.Thread(target=work, args=(n * 50,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    records = read_jsonl(path)
    assert sorted(int(r["id"]) for r in records) == list(range(200))


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "new.jsonl"))
    check_writable("-")
    existing = tmp_path / "old.jsonl"
    existing.write_text("keep\n")
    check_writable(str(existing))
    assert existing.read_text() == "keep\n"  # probing does not touch it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl"]  # no probe left over
    with pytest.raises(InputError, match="does not exist") as info:
        check_writable(str(tmp_path / "missing_dir" / "out.jsonl"))
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="is a directory"):
        check_writable(str(tmp_path))
    with pytest.raises(InputError):
        RecordWriter(str(tmp_path / "nope" / "out.jsonl"), append=False)


# ----------------------------------------------------------------------------- OrderedEmitter


def collect(**kwargs) -> tuple[OrderedEmitter, list[dict]]:
    written: list[dict] = []
    return OrderedEmitter(written.append, **kwargs), written


def test_ordered_emission_with_shuffled_finish_order():
    emitter, written = collect(window=1000)
    order = list(range(200))
    random.Random(7).shuffle(order)
    for index in order:
        emitter.emit(index, {"id": str(index)})
        ids = [int(r["id"]) for r in written]
        assert ids == list(range(len(ids)))  # always a prefix, in order
    assert len(written) == 200 and emitter.pending == 0


def test_ordered_holds_back_until_lower_index_arrives():
    emitter, written = collect()
    emitter.emit(2, {"id": "2"})
    emitter.emit(1, {"id": "1"})
    assert written == [] and emitter.pending == 2
    emitter.emit(0, {"id": "0"})
    assert [r["id"] for r in written] == ["0", "1", "2"]
    assert emitter.next_to_write == 3


def test_unordered_writes_immediately():
    emitter, written = collect(ordered=False, window=1)
    emitter.emit(5, {"id": "5"})
    emitter.emit(0, {"id": "0"})
    assert [r["id"] for r in written] == ["5", "0"]
    assert emitter.can_admit(10**6)


def test_window_bounds_admission():
    emitter, _ = collect(window=4)
    assert emitter.can_admit(3) and not emitter.can_admit(4)
    emitter.emit(1, {"id": "1"})
    assert not emitter.can_admit(4)  # row 0 still blocks
    emitter.emit(0, {"id": "0"})
    assert emitter.can_admit(5) and not emitter.can_admit(6)


def test_producer_respecting_the_window_never_buffers_more_than_window():
    emitter, written = collect(window=8)
    rng = random.Random(3)
    in_flight: list[int] = []
    peak = 0
    next_row = 0
    while len(written) < 100:
        while next_row < 100 and emitter.can_admit(next_row):
            in_flight.append(next_row)
            next_row += 1
        assert len(in_flight) <= 8
        done = in_flight.pop(rng.randrange(len(in_flight)))
        emitter.emit(done, {"id": str(done)})
        peak = max(peak, emitter.pending)
    assert peak < 8
    assert [int(r["id"]) for r in written] == list(range(100))


def test_wait_admit_unblocks_when_lower_rows_are_written():
    emitter, _ = collect(window=2)
    assert emitter.wait_admit(2, timeout=0.01) is False
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(emitter.wait_admit(2, timeout=5)))
    waiter.start()
    emitter.emit(0, {"id": "0"})
    waiter.join(5)
    assert result == [True]


def test_skip_keeps_order_moving():
    emitter, written = collect()
    emitter.emit(3, {"id": "3"})
    emitter.skip(1)
    emitter.emit(0, {"id": "0"})
    assert [r["id"] for r in written] == ["0"]
    emitter.skip(2)
    assert [r["id"] for r in written] == ["0", "3"]
    assert emitter.next_to_write == 4
    with pytest.raises(InvalidArgumentError):
        emitter.emit(2, {"id": "2"})


def test_flush_all_writes_buffered_in_order_despite_gaps():
    emitter, written = collect()
    for index in (7, 2, 5):
        emitter.emit(index, {"id": str(index)})
    emitter.skip(4)
    assert written == []
    emitter.flush_all()
    assert [r["id"] for r in written] == ["2", "5", "7"]
    emitter.emit(0, {"id": "0"})  # a late finisher after an interrupt still lands
    assert written[-1] == {"id": "0"}
    assert emitter.can_admit(10**6)


def test_window_must_be_positive():
    with pytest.raises(InvalidArgumentError):
        OrderedEmitter(lambda record: None, window=0)


# ----------------------------------------------------------------------------- make_record


def test_make_record_minimal_schema():
    assert make_record("3", {"answer": "x"}, None) == {
        "id": "3",
        "vars": {"answer": "x"},
        "error": None,
    }


def test_make_record_error_forms():
    record = make_record(4, {}, ValueError("bad input"))
    assert record["id"] == "4"
    assert record["error"] == {"type": "ValueError", "message": "bad input"}
    assert make_record("a", None, "boom")["error"] == {"type": "Error", "message": "boom"}
    typed = make_record("a", None, {"type": "InputError", "message": "x:1: bad"})
    assert typed["error"] == {"type": "InputError", "message": "x:1: bad"}
    assert make_record("a", None, KeyError())["error"]["message"] == "KeyError"


def test_make_record_optional_keys_only_when_given():
    plain = make_record("1", {}, None)
    assert set(plain) == {"id", "vars", "error"}
    full = make_record(
        "1", {}, None, row={"q": 1}, text="t", messages=[{"role": "user"}], meta={"ms": 3}
    )
    assert full["input"] == {"q": 1} and full["text"] == "t"
    assert full["messages"] == [{"role": "user"}] and full["meta"] == {"ms": 3}
    assert make_record("1", {}, None, text="")["text"] == ""


def test_vars_are_made_json_serialisable():
    class Thing:
        def __str__(self) -> str:
            return "thing!"

    record = make_record(
        "1",
        {"obj": Thing(), "dec": Decimal("1.5"), "tup": (1, {2}), "nan": float("nan"), 3: "k"},
        None,
    )
    assert record["vars"] == {"obj": "thing!", "dec": "1.5", "tup": [1, [2]], "nan": None, "3": "k"}
    json.dumps(record, allow_nan=False)  # strictly valid JSON
    assert to_jsonable(b"\xffa") == "\ufffda"


def test_a_writer_without_flush_each_hands_records_over_on_flush(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = RecordWriter(str(path), append=False, flush_each=False)
    writer.write({"id": "0"})
    writer.write({"id": "1"})
    assert path.read_bytes() == b""  # still in the buffer
    writer.flush()
    assert [r["id"] for r in read_jsonl(path)] == ["0", "1"]
    writer.write({"id": "2"})
    writer.close()
    assert [r["id"] for r in read_jsonl(path)] == ["0", "1", "2"]
