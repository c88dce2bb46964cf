"""The call cache from Python: reruns replay, edits resend only what changed, keys miss when
anything that decides an answer changes, and a broken cache never fails a run.

The model is the SGLang stub (a real loopback HTTP server); every ``/generate`` item it gets is
counted by the step its prompt ends in.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

import sglrun as sgl
from sglrun.errors import InvalidArgumentError
from sglrun.lang.cache_store import APPLICATION_ID, CacheStore
from sglrun.lang.call_cache import CallCache, release_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from sglang_stub import SGLangStub  # noqa: E402

ROWS = [{"topic": f"topic {index}"} for index in range(200)]


@sgl.function
def three_steps(s, topic):
    s += "Topic: " + topic + "\nStep1:" + sgl.gen("one", max_tokens=4, stop="\n")
    s += "\nStep2:" + sgl.gen("two", max_tokens=4, temperature=0.8)
    s += "\nStep3:" + sgl.select("three", choices=["yes", "no"])


@sgl.function
def three_steps_edited(s, topic):
    s += "Topic: " + topic + "\nStep1:" + sgl.gen("one", max_tokens=4, stop="\n")
    s += "\nStep2:" + sgl.gen("two", max_tokens=4, temperature=0.8)
    s += "\nStep3 (checked):" + sgl.select("three", choices=["yes", "no"])


def items(server: SGLangStub) -> list[str]:
    return server.prompts()


def by_step(prompts: list[str]) -> dict[str, int]:
    """How many /generate items each step of ``three_steps`` sent."""
    counts = {"step1": 0, "step2": 0, "step3": 0}
    for prompt in prompts:
        counts["step3" if "Step3" in prompt else "step2" if "Step2" in prompt else "step1"] += 1
    return counts


@pytest.fixture
def server():
    with SGLangStub() as stub:
        yield stub


@pytest.fixture
def backend(server):
    endpoint = sgl.RuntimeEndpoint(server.url)
    yield endpoint
    endpoint.shutdown()


@pytest.fixture
def cache(tmp_path):
    opened = CallCache.open(tmp_path / "calls.sqlite")
    yield opened
    release_store(opened.store)


def values(states):
    return [state.variables() for state in states]


def test_rerun_sends_nothing_and_an_edit_sends_only_its_step(server, backend, cache):
    first = three_steps.run_batch(ROWS, backend=backend, cache=cache)
    sent = by_step(items(server))
    assert sent["step1"] == 200 and sent["step2"] == 200 and sent["step3"] >= 200
    assert cache.misses == 600 and cache.hits == 0

    server.clear()
    again = three_steps.run_batch(ROWS, backend=backend, cache=cache)
    assert items(server) == []  # not one request
    assert values(again) == values(first)
    assert cache.hits == 600
    meta = again[0].get_meta_info("one")
    assert meta["cached"] is True and meta["completion_tokens"] == 4
    assert again[0].get_meta_info("three")["cached"] is True
    assert cache.tokens_saved > 0

    server.clear()
    edited = three_steps_edited.run_batch(ROWS, backend=backend, cache=cache)
    sent = by_step(items(server))
    assert sent["step1"] == 0 and sent["step2"] == 0 and sent["step3"] >= 200
    assert [v["one"] for v in values(edited)] == [v["one"] for v in values(first)]
    assert edited[0].get_meta_info("one")["cached"] is True
    assert "cached" not in edited[0].get_meta_info("three")


def test_another_model_or_temperature_misses(server, backend, cache, tmp_path):
    three_steps.run_batch(ROWS[:10], backend=backend, cache=cache)
    server.clear()
    three_steps.run_batch(ROWS[:10], backend=backend, cache=cache, temperature=0.5)
    assert by_step(items(server))["step1"] == 10  # the run's temperature reaches step 1

    server.clear()
    other = SGLangStub()
    other.model_path = "another/model"
    with other:
        elsewhere = sgl.RuntimeEndpoint(other.url)
        three_steps.run_batch(ROWS[:10], backend=elsewhere, cache=cache)
        assert by_step(items(other))["step1"] == 10
        elsewhere.shutdown()

    server.clear()  # the same model at another address is the same model: it replays
    with SGLangStub() as twin:
        moved = sgl.RuntimeEndpoint(twin.url)
        three_steps.run_batch(ROWS[:10], backend=moved, cache=cache)
        assert items(twin) == []
        moved.shutdown()


def test_refresh_mode_sends_again_and_stores_the_new_answers(server, backend, tmp_path):
    path = tmp_path / "calls.sqlite"
    three_steps.run_batch(ROWS[:5], backend=backend, cache=path)
    server.clear()
    refreshing = CallCache.open(path, mode="refresh")
    three_steps.run_batch(ROWS[:5], backend=backend, cache=refreshing)
    assert len(items(server)) >= 15 and refreshing.hits == 0
    server.clear()
    three_steps.run_batch(ROWS[:5], backend=backend, cache=path)
    assert items(server) == []


def test_identical_sampled_requests_keep_their_own_samples(backend, cache):
    """fork(3) over one prompt at temperature > 0: a rerun replays three cached calls, one
    per fork (not one sample three times), and the calls are counted apart."""

    @sgl.function
    def vote(s):
        s += "Pick a word:"
        forks = s.fork(3)
        for fork in forks:
            fork += sgl.gen("word", max_tokens=3, temperature=0.9)
        forks.join()

    vote.run(backend=backend, cache=cache)
    assert cache.misses == 3
    vote.run(backend=backend, cache=cache)
    assert cache.hits == 3 and cache.misses == 3
    with sqlite3.connect(cache.store.path) as conn:
        cache.store.flush()
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 3


def test_greedy_identical_requests_share_one_entry(backend, cache):
    """At temperature 0 two forks asking the same thing get one answer: one entry."""

    @sgl.function
    def twice(s):
        s += "Say:" + sgl.gen("a", max_tokens=3, temperature=0)
        forks = s.fork(2)
        for fork in forks:
            fork += "Again:" + sgl.gen("b", max_tokens=3, temperature=0)
        forks.join()

    twice.run(backend=backend, cache=cache)
    twice.run(backend=backend, cache=cache)
    assert cache.hits == 3
    cache.store.flush()
    with sqlite3.connect(cache.store.path) as conn:
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 2


def test_streaming_run_replays_the_text(server, backend, cache):
    @sgl.function
    def story(s):
        s += "Once:" + sgl.gen("text", max_tokens=6, temperature=0)

    first = story.run(backend=backend, cache=cache, stream=True)
    streamed = "".join(first.text_iter("text"))
    server.clear()
    second = story.run(backend=backend, cache=cache, stream=True)
    assert "".join(second.text_iter("text")) == streamed == first["text"]
    assert items(server) == [] and second.get_meta_info("text")["cached"] is True


def test_set_cache_is_used_by_every_run_until_turned_off(server, backend, tmp_path):
    cache = sgl.set_cache(tmp_path / "global.sqlite")
    try:
        assert isinstance(cache, CallCache)
        three_steps.run(topic="x", backend=backend)
        server.clear()
        state = three_steps.run(topic="x", backend=backend)
        assert items(server) == [] and cache.hits == 3
        server.clear()
        three_steps.run(topic="x", backend=backend, cache=False)  # a run's own choice wins
        assert len(items(server)) >= 3
    finally:
        assert sgl.set_cache(None) is None
    server.clear()
    three_steps.run(topic="x", backend=backend)
    assert len(items(server)) >= 3
    assert state["three"] in ("yes", "no")
    with pytest.raises(InvalidArgumentError, match="mode"):
        sgl.set_cache(tmp_path / "x.sqlite", mode="sometimes")


def test_a_nested_program_shares_its_callers_cache(server, backend, cache):
    @sgl.function
    def inner(s, topic):
        s += "Inner " + topic + ":" + sgl.gen("x", max_tokens=3, temperature=0)

    @sgl.function
    def outer(s, topic):
        s += "Outer:" + sgl.gen("y", max_tokens=3, temperature=0)
        s += inner.run(topic=topic, backend=backend)["x"]

    outer.run(topic="a", backend=backend, cache=cache)
    assert cache.misses == 2
    server.clear()
    outer.run(topic="a", backend=backend, cache=cache)
    assert items(server) == [] and cache.hits == 2


def test_a_program_parameter_named_cache_stays_the_programs(backend, tmp_path):
    @sgl.function
    def uses_cache(s, cache):
        s += f"Cache is {cache}:" + sgl.gen("x", max_tokens=2)

    state = uses_cache.run(cache="warm", backend=backend)
    assert state.text().startswith("Cache is warm:")
    assert not list(tmp_path.iterdir())


def test_an_unparsable_answer_is_not_replayed_as_an_error(backend, cache):
    """A failed call is never cached: the next run asks again."""

    @sgl.function
    def typed(s):
        s += "Number:" + sgl.gen("n", max_tokens=3, regex=r"[0-9]+", temperature=0)

    typed.run(backend=backend, cache=cache)
    assert cache.misses == 1


def test_corrupt_cache_file_warns_once_and_runs_uncached(server, backend, tmp_path, caplog):
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"this is not a database, it is a note I care about\n" * 100)
    before = path.read_bytes()
    caplog.set_level("WARNING", logger="sglrun.cache")
    states = three_steps.run_batch(ROWS[:20], backend=backend, cache=path)
    assert all(state.error() is None for state in states)
    assert len(items(server)) >= 60
    warnings = [r.getMessage() for r in caplog.records if r.name == "sglrun.cache"]
    assert len(warnings) == 1 and "running without the cache" in warnings[0]
    assert str(path) in warnings[0]
    assert path.read_bytes() == before  # never written to


def test_a_sqlite_file_that_is_not_a_cache_is_left_alone(tmp_path, caplog):
    path = tmp_path / "mine.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
    store = CacheStore(path)
    assert not store.enabled and "not an sglrun cache" in (store.broken or "")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        assert conn.execute("SELECT body FROM notes").fetchall() == [("keep me",)]


def test_a_locked_cache_runs_uncached(server, backend, tmp_path, caplog):
    path = tmp_path / "calls.sqlite"
    CacheStore(path).close()  # a real cache file
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        caplog.set_level("WARNING", logger="sglrun.cache")
        states = three_steps.run_batch(ROWS[:10], backend=backend, cache=path)
        assert all(state.error() is None for state in states)
        assert len(items(server)) >= 30
        assert any("locked" in r.getMessage() for r in caplog.records)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_the_file_is_bounded_least_recently_used_first(tmp_path):
    store = CacheStore(tmp_path / "calls.sqlite", max_bytes=800_000)
    for index in range(3000):
        store.put(index.to_bytes(16, "little"), b"v" * 200)
    store.flush()
    time.sleep(1.1)  # last use is kept in seconds: the next entries are newer
    for index in range(3000, 6000):
        store.put(index.to_bytes(16, "little"), b"v" * 200)
    store.flush()
    stats = store.stats()
    assert stats.entries < 6000  # pruned on the way
    # Freed pages go back to the disk. The size is checked every 1,000 entries written, so up
    # to ~1,500 entries (~375 KB here) may follow the last prune; unpruned, the file is ~1.5 MB.
    assert store.path.stat().st_size < 800_000 * 1.4
    newest = (5999).to_bytes(16, "little")
    assert store.get_many([newest]) == {newest: b"v" * 200}
    assert store.get_many([(0).to_bytes(16, "little")]) == {}
    store.close()


def test_prune_and_clear(tmp_path):
    store = CacheStore(tmp_path / "calls.sqlite")
    for index in range(100):
        store.put(index.to_bytes(16, "little"), b"x" * 100)
    store.flush()
    with sqlite3.connect(store.path) as conn:  # half the entries were last used long ago
        conn.execute("UPDATE calls SET used = used - 90000 WHERE substr(key, 1, 1) < x'32'")
    old = 50  # keys 0..49 start with a byte below 0x32
    assert store.prune(older_than=86400) == old
    assert store.stats().entries == 100 - old
    assert store.clear() == 100 - old
    assert store.stats().entries == 0
    store.close()


def test_writes_from_many_threads_all_land(tmp_path):
    store = CacheStore(tmp_path / "calls.sqlite")

    def write(base: int) -> None:
        for index in range(500):
            store.put((base + index).to_bytes(16, "little"), b"%d" % (base + index))

    threads = [threading.Thread(target=write, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    assert store.stats().entries == 2000
    store.close()


def test_api_keys_never_reach_the_cache(tmp_path):
    secret = "sk-test-THIS-IS-SECRET-123456"
    cache = CallCache.open(tmp_path / "calls.sqlite")
    first = sgl.OpenAI("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key=secret)
    second = sgl.OpenAI("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="sk-other")
    assert cache.identity(first) == cache.identity(second)  # the key is no part of it
    assert secret.encode() not in (cache.identity(first) or b"")
    anthropic = sgl.Anthropic("claude-x", api_key=secret)
    assert secret.encode() not in (cache.identity(anthropic) or b"")
    behind_password = sgl.OpenAI("m", base_url=f"http://user:{secret}@127.0.0.1:9/v1")
    assert secret.encode() not in (cache.identity(behind_password) or b"")
    release_store(cache.store)


def test_cache_arguments_are_checked(backend, tmp_path):
    with pytest.raises(InvalidArgumentError, match="cache must be"):
        three_steps.run(topic="x", backend=backend, cache=42)
    store = CacheStore(tmp_path / "calls.sqlite")
    with pytest.raises(InvalidArgumentError, match="cache mode"):
        CallCache(store, mode="fresh")
    store.close()


def test_get_many_reads_any_bytes_in_one_row_and_touches_only_stale_entries(tmp_path):
    store = CacheStore(tmp_path / "calls.sqlite")
    values = {index.to_bytes(16, "big"): bytes([index % 256, 32, 0]) * (index % 5)
              for index in range(300)}  # fmt: skip
    for key, value in values.items():
        store.put(key, value)
    store.flush()
    stale = [key for index, key in enumerate(values) if index % 3 == 0]
    recent = int(time.time()) - 100  # used lately: not worth a write
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE calls SET used=?", (recent,))
        conn.executemany("UPDATE calls SET used=? WHERE key=?", [(1000, key) for key in stale])
    wanted = [*values, b"\x00" * 15 + b"\xff", b" " * 16]  # two keys that are not there
    assert store.get_many(wanted) == values  # spaces, zero bytes and empty values intact
    store.flush()
    with sqlite3.connect(store.path) as conn:
        used = dict(conn.execute("SELECT key, used FROM calls").fetchall())
    assert all(used[key] > time.time() - 60 for key in stale)  # refreshed
    assert all(used[key] == recent for key in values if key not in stale)
    store.close()


def test_equal_values_written_differently_are_one_call(server, backend, cache):
    """0 and 0.0, a schema as a dict or as JSON text: the same request, so the same entry."""

    def program(temperature, schema):
        @sgl.function
        def ask(s, topic):
            s += "Topic: " + topic + sgl.gen("a", max_tokens=4, temperature=temperature)
            s += sgl.gen("b", max_tokens=4, json_schema=schema)

        return ask

    first = program(0, {"type": "object"})
    states = first.run_batch(ROWS[:5], backend=backend, cache=cache)
    assert all(state.error() is None for state in states) and cache.misses == 10
    server.clear()
    again = program(0.0, '{"type":"object"}').run_batch(ROWS[:5], backend=backend, cache=cache)
    assert items(server) == [] and cache.hits == 10
    assert values(again) == values(states)
