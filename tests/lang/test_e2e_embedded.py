"""Every primitive, end to end, on the real embedded SmolLM2 engine.

The model is tiny: these tests assert mechanics (constraints honoured, types parsed, variables
set, forks joined, streams chunked, errors surfaced), never world knowledge.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

import sglrun as sgl
from sglrun.errors import UnsupportedCapabilityError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine():
    backend = sgl.LlamaCpp(n_parallel=8)
    yield backend
    backend.shutdown()


def run(program, engine, *args, **kwargs):
    state = program.run(*args, backend=engine, temperature=0, **kwargs)
    assert state.error() is None, state.error()
    return state


@sgl.function
def chat_answer(s, question: str, max_tokens: int = 12):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens))


def test_gen_in_chat_roles_uses_template_and_limits(engine):
    state = run(chat_answer, engine, "Say hello.", 6)
    assert state.get_meta_info("answer")["completion_tokens"] <= 6
    assert state.text().startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert "<|im_end|>" not in state["answer"]  # the template's stop string was honoured
    roles = [m["role"] for m in state.messages()]
    assert roles == ["system", "user", "assistant"]
    assert state.messages()[-1]["content"] == state["answer"].lstrip()


def test_stop_string_and_finish_reason(engine):
    @sgl.function
    def listing(s):
        s += "Numbers: 1, 2, 3, 4," + sgl.gen("rest", max_tokens=24, stop=",")

    state = run(listing, engine)
    assert "," not in state["rest"]
    assert state.get_meta_info("rest")["finish_reason"]["type"] in ("stop", "length")


def test_regex_json_schema_and_dtypes_are_constrained(engine):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }

    @sgl.function
    def extract(s, text: str):
        s += sgl.user("Text: " + text + "\nGive the year.")
        s += sgl.assistant(sgl.gen("year", regex=r"(19|20)[0-9]{2}", max_tokens=8))
        s += sgl.user("Age as a number?")
        s += sgl.assistant(sgl.gen_int("age", max_tokens=6))
        s += sgl.user("As JSON.")
        s += sgl.assistant(sgl.gen("person", json_schema=json.dumps(schema), max_tokens=160))
        s += sgl.user("Is it true?")
        s += sgl.assistant(sgl.gen("flag", dtype=bool, max_tokens=4))

    state = run(extract, engine, "Maria, 31, moved to Lisbon in 2016.")
    assert re.fullmatch(r"(19|20)[0-9]{2}", state["year"])
    assert isinstance(state["age"], int)
    person = json.loads(state["person"])
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert isinstance(state["flag"], bool)


def test_select_scores_every_choice_with_each_method(engine):
    for method in (
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ):

        @sgl.function
        def pick(s, method=method):
            s += sgl.user("Is fire hot? Answer yes or no.")
            s += sgl.assistant(
                sgl.select("reply", choices=["yes", "no", "maybe later"], choices_method=method)
            )

        state = run(pick, engine)
        meta = state.get_meta_info("reply")
        assert state["reply"] in ("yes", "no", "maybe later")
        scores = meta["normalized_prompt_logprobs"]
        assert len(scores) == 3 and all(isinstance(x, float) for x in scores)
        if method is sgl.token_length_normalized:
            best = max(range(3), key=scores.__getitem__)
            assert state["reply"] == ["yes", "no", "maybe later"][best]


def test_fork_join_gathers_and_concatenates(engine):
    @sgl.function
    def tips(s):
        s += "Two tips for sleeping well:\n"
        forks = s.fork(2)
        forks += lambda i: f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=8, stop="\n") + "\n"
        forks.join()
        s += "In short:" + sgl.gen("summary", max_tokens=8, stop="\n")

    state = run(tips, engine)
    assert isinstance(state["tip"], list) and len(state["tip"]) == 2
    assert isinstance(state["summary"], str)

    @sgl.function
    def concat(s):
        s += "Colors:"
        forks = s.fork(2)
        forks += " " + sgl.gen("c", regex=r"[a-z]{2,6}", max_tokens=6)
        parts = [forks[0]["c"], forks[1]["c"]]
        forks.join("concate_and_append")
        s["parts"] = parts

    joined = run(concat, engine)
    first, second = joined["parts"]
    assert joined.text() == f"Colors: {first} {second}"


def test_streaming_delivers_chunks(engine):
    state = chat_answer.run("Count to five.", 16, backend=engine, stream=True, temperature=0)
    chunks = list(state.text_iter("answer"))
    assert len(chunks) >= 3
    assert "".join(chunks) == state["answer"]


def test_run_batch_keeps_order_and_n_samples(engine):
    rows = [{"question": f"Repeat the number {i}.", "max_tokens": 4} for i in range(6)]
    states = chat_answer.run_batch(rows, backend=engine, temperature=0)
    for i, state in enumerate(states):
        assert f"number {i}." in state.text()
        assert state.error() is None

    @sgl.function
    def many(s):
        s += "A fruit:" + sgl.gen("fruit", n=3, max_tokens=4, temperature=0.8)

    assert len(run(many, engine)["fruit"]) == 3


def test_logprobs_in_meta_info(engine):
    @sgl.function
    def scored(s):
        s += "The sky is" + sgl.gen(
            "rest", max_tokens=4, return_logprob=True, top_logprobs_num=2, ignore_eos=True
        )

    meta = run(scored, engine).get_meta_info("rest")
    assert meta["completion_tokens"] == 4
    assert len(meta["output_token_logprobs"]) == 4
    logprob, token_id, _ = meta["output_token_logprobs"][0]
    assert logprob <= 0 and isinstance(token_id, int)
    assert len(meta["output_top_logprobs"][0]) == 2


def test_separate_reasoning_on_constrained_output(engine):
    @sgl.function
    def reason(s):
        with s.assistant():
            s += sgl.separate_reasoning(
                sgl.gen("out", regex=r"<think>[a-z ]{1,12}</think>[a-z ]{1,12}", max_tokens=24),
                model_type="deepseek-r1",
            )

    state = run(reason, engine)
    assert "<think>" not in state["out"] and state["out_reasoning_content"]


def test_images_fail_clearly_on_a_text_model(engine, tmp_path):
    picture = tmp_path / "x.png"
    picture.write_bytes(b"\x89PNG not really")

    @sgl.function
    def look(s, path: str):
        s += sgl.user(sgl.image(path) + "What is this?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=4))

    state = look.run(str(picture), backend=engine)
    assert isinstance(state.error(), UnsupportedCapabilityError)
    assert "cannot take images" in str(state.error())


def test_default_backend_is_the_embedded_engine(engine):
    previous = sgl.global_config.default_backend
    sgl.set_default_backend(engine)
    try:
        state = chat_answer.run("Hi", 3, temperature=0)
        assert state.error() is None and state["answer"] is not None
    finally:
        sgl.global_config.default_backend = previous


def test_call_cache_replays_exactly_what_the_engine_said(engine, tmp_path):
    """Temperature 0, rows one at a time (no batching noise): the run with the cache, its
    replay and a run without the cache give the same variables; the replay asks nothing."""

    @sgl.function
    def two_steps(s, city: str):
        s += sgl.user("Name one thing " + city + " is known for, in three words.")
        s += sgl.assistant(sgl.gen("thing", max_tokens=8))
        s += sgl.user("Is that food?")
        s += sgl.assistant(sgl.select("food", choices=["yes", "no"]))

    rows = [{"city": city} for city in ("Paris", "Rome", "Tokyo", "Cairo")]
    cache = sgl.CallCache.open(tmp_path / "calls.sqlite")
    kwargs = {"backend": engine, "temperature": 0, "num_threads": 1}
    filled = two_steps.run_batch(rows, cache=cache, **kwargs)
    assert cache.misses == 8 and cache.hits == 0
    replayed = two_steps.run_batch(rows, cache=cache, **kwargs)
    assert cache.hits == 8 and cache.misses == 8
    plain = two_steps.run_batch(rows, cache=False, **kwargs)
    assert [s.variables() for s in filled] == [s.variables() for s in replayed]
    assert [s.variables() for s in plain] == [s.variables() for s in filled]
    assert all(s.get_meta_info("thing")["cached"] for s in replayed)
    assert [s.text() for s in replayed] == [s.text() for s in plain]
    # the model file is part of the key by its content, hashed once and remembered
    with sqlite3.connect(cache.store.path) as conn:
        (digest,) = conn.execute("SELECT digest FROM files").fetchone()
    assert len(digest) == 64
