"""Programs in the style of SGLang's examples and benchmarks, run unchanged under
``import sglang as sgl`` on the embedded engine (the session's default backend)."""

from __future__ import annotations

import asyncio
import json
import math
import re

import pytest
import sglang as sgl
from pydantic import BaseModel
from sglang.srt.constrained import build_regex_from_object

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("engine")]


def ok(state):
    assert state.error() is None, state.error()
    return state


# --- few-shot QA with select (benchmark/mmlu, hellaswag) ---------------------------------


@sgl.function
def few_shot_select(s, question):
    s += "The following are true or false questions.\n\n"
    s += "Q: The sky is blue.\nA: True\n\n"
    s += "Q: Fish can fly to the moon.\nA: False\n\n"
    s += "Q: " + question + "\nA:" + sgl.select("answer", choices=[" True", " False"])


def test_few_shot_select_in_batch():
    states = few_shot_select.run_batch(
        [{"question": "Water is wet."}, {"question": "Stones can sing."}], temperature=0
    )
    for state in map(ok, states):
        assert state["answer"] in (" True", " False")
        meta = state.get_meta_info("answer")
        assert {"normalized_prompt_logprobs", "input_token_logprobs"} <= set(meta)
        assert len(meta["normalized_prompt_logprobs"]) == 2


# --- tree of thought with nested forks (examples/usage/tree_of_thought) ------------------


@sgl.function
def tree_of_thought(s, question, breadth=2):
    s += sgl.user(question)
    forks = s.fork(breadth)
    forks += sgl.assistant(sgl.gen("plan", max_tokens=8, temperature=0))
    for fork in forks:
        leaves = fork.fork(breadth)
        leaves += sgl.user("Go on.")
        leaves += sgl.assistant(sgl.gen("step", max_tokens=6, temperature=0))
        leaves.join()
    forks.join()


def test_nested_forks_gather_lists_of_lists():
    state = ok(tree_of_thought.run("How do I boil an egg?"))
    assert len(state["plan"]) == 2 and all(isinstance(p, str) for p in state["plan"])
    assert [len(step) for step in state["step"]] == [2, 2]
    assert all(isinstance(text, str) for step in state["step"] for text in step)


# --- multi-turn chat (benchmark/mtbench) ---------------------------------------------------


@sgl.function
def answer_mt_bench(s, question_1, question_2):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=12))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=12))


def test_multi_turn_chat_messages():
    state = ok(answer_mt_bench.run("Name a fruit.", "Name another.", temperature=0))
    assert len(state.messages()) in (4, 5)  # SGLang's test_mt_bench assertion
    assert [m["role"] for m in state.messages()][-4:] == ["user", "assistant"] * 2
    assert state.messages()[-1]["content"] == state["answer_2"].strip()


# --- json decode with regex and schema (examples/usage/json_decode) ----------------------


class City(BaseModel):
    name: str
    population: int


@sgl.function
def json_by_regex(s, topic):
    s += sgl.user("Describe " + topic + " as JSON.")
    s += sgl.assistant(
        sgl.gen("json_output", max_tokens=96, temperature=0, regex=build_regex_from_object(City))
    )


@sgl.function
def json_by_schema(s, topic, schema):
    s += sgl.user("Describe " + topic + " as JSON.")
    s += sgl.assistant(sgl.gen("json_output", max_tokens=96, temperature=0, json_schema=schema))


def test_json_decode_by_regex_from_a_pydantic_model():
    state = ok(json_by_regex.run("Paris"))
    text = state["json_output"]
    if state.get_meta_info("json_output")["finish_reason"]["type"] == "stop":
        city = City.model_validate_json(text)
        assert isinstance(city.population, int)
    else:  # cut by max_tokens: still a prefix the regex allows
        assert text.startswith('{"name"') or text.startswith('{ "name"')


def test_json_schema_is_strict_and_compact():
    schema = json.dumps(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "rank": {"type": "integer"},
            },
            "required": ["name", "rank"],
        }
    )
    states = json_by_schema.run_batch(
        [{"topic": t, "schema": schema} for t in ("Paris", "a cat", "tea", "Mars")]
    )
    for state in states:
        if state.error() is not None:  # cut by max_tokens: an error naming the variable
            assert "'json_output'" in str(state.error()) and "max_tokens" in str(state.error())
            continue
        value = json.loads(state["json_output"])
        assert set(value) == {"name", "rank"}  # no key the schema did not list
        assert "\n" not in state["json_output"]


# --- streaming with meta (test_programs.test_stream_logprobs) ------------------------------


@sgl.function
def qa(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", return_logprob=True))


def test_streaming_chunks_carry_their_own_logprobs():
    state = qa.run(question="Tell me a story.", stream=True, temperature=0, max_new_tokens=32)

    async def collect():
        return [c async for c in state.text_async_iter("answer", return_meta_data=True)]

    chunks = asyncio.run(collect())
    assert len(chunks) > 1
    before = 0
    for chunk_text, meta_info in chunks:
        assert chunk_text
        assert "output_token_logprobs" in meta_info and "output_token_logprobs_length" in meta_info
        assert meta_info["completion_tokens"] == meta_info["output_token_logprobs_length"]
        assert len(meta_info["output_token_logprobs"]) == meta_info["completion_tokens"] - before
        before = meta_info["completion_tokens"]
    assert "".join(text for text, _ in chunks) == state["answer"]
    assert list(qa.run(question="Hi", stream=True, max_new_tokens=8).text_iter("answer"))


# --- tool use / ReAct (examples/usage/react, test_programs.test_tool_use) -----------------


@sgl.function
def tool_use(s, question):
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "
    if s["tool"] == "calculator":
        s += "The math expression is" + sgl.gen("expression", max_tokens=12, stop=".")
    else:
        s += "The key word to search is" + sgl.gen("word", max_tokens=8, stop=".")


def test_tool_use_branches_on_the_selected_tool():
    state = ok(tool_use.run("What is 257 times 983", temperature=0))
    assert state["tool"] in ("calculator", "search engine")
    branch = "expression" if state["tool"] == "calculator" else "word"
    assert isinstance(state[branch], str) and "." not in state[branch]
    meta = state.get_meta_info("tool")  # examples/usage/choices_logprob reads these
    assert len(meta["input_token_logprobs"]) == 2


# --- parallel sample with n ---------------------------------------------------------------


def test_parallel_samples_with_n():
    @sgl.function
    def samples(s):
        s += "A colour: " + sgl.gen("colour", n=3, max_tokens=4, temperature=1.0)

    state = ok(samples.run())
    assert isinstance(state["colour"], list) and len(state["colour"]) == 3
    assert len(state.get_meta_info("colour")["finish_reason"]) == 3


# --- cot decoding: max_tokens=0 gives the next token's top-k (examples/usage/cot_decoding) --


def test_max_tokens_zero_gives_the_next_tokens_top_logprobs():
    @sgl.function
    def top_k(s, k):
        s += sgl.user("What is 2 + 3?")
        s += sgl.assistant_begin()
        step_0 = s.fork(1)[0]
        step_0 += sgl.gen("get_top_k", max_tokens=0, return_logprob=True, top_logprobs_num=k,
                          return_text_in_logprobs=True)  # fmt: skip
        logprobs = step_0.get_meta_info("get_top_k")["output_top_logprobs"][0]
        forks = s.fork(k)
        for fork, (_logprob, _token_id, text) in zip(forks, logprobs):
            fork += text + sgl.gen("answer", max_tokens=4, temperature=0)
        forks.join()
        s.set_var("first_tokens", [text for _, _, text in logprobs])

    state = ok(top_k.run(k=3))
    assert len(state["first_tokens"]) == 3
    assert all(isinstance(token, str) for token in state["first_tokens"])
    assert len(state["answer"]) == 3
    assert str(state).startswith("ProgramState(") and not str(state).startswith("ProgramState('")


# --- min_tokens (test_programs.test_gen_min_new_tokens) ------------------------------------


def test_min_tokens_is_honoured():
    @sgl.function
    def long_answer(s):
        s += sgl.user("Say yes.")
        s += sgl.assistant(sgl.gen("answer", min_tokens=24, max_tokens=40, temperature=0))

    state = ok(long_answer.run())
    assert state.get_meta_info("answer")["completion_tokens"] >= 24


# --- typed gens (test_programs.test_decode_int, test_dtype_gen) ----------------------------


def test_typed_gens_parse():
    @sgl.function
    def typed(s):
        s += "Q: How many hours in a day?\nA: " + sgl.gen_int("hours", max_tokens=4) + "\n"
        s += "Q: Is water wet?\nA: " + sgl.gen("wet", dtype=bool, max_tokens=3) + "\n"
        s += "Q: Name a city.\nA: " + sgl.gen_string("city", max_tokens=12)

    state = ok(typed.run(temperature=0))
    assert isinstance(state["hours"], int) and isinstance(state["wet"], bool)
    assert isinstance(state["city"], str)


# --- reasoning separation (docs/frontend/frontend_reasoning) -------------------------------


def test_separate_reasoning_sets_both_variables():
    @sgl.function
    def basic_qa_separate_reasoning(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant_begin()
        s += sgl.separate_reasoning(sgl.gen("answer", max_tokens=16), model_type="deepseek-r1")
        s += sgl.assistant_end()

    state = ok(basic_qa_separate_reasoning.run("List one country.", temperature=0))
    keys = state.stream_executor.variable_event.keys()
    assert {"answer", "answer_reasoning_content"} <= set(keys)
    assert state["answer_reasoning_content"] == ""  # SmolLM2 does not think aloud
    assert state.messages()[-1]["content"] == state["answer"].strip()


# --- sgl.Runtime and sgl.Engine on a GGUF file ---------------------------------------------


def test_runtime_and_engine_on_a_gguf_file(engine):
    runtime = sgl.Runtime(model_path=str(engine.model_path), mem_fraction_static=0.5)
    try:

        @sgl.function
        def hello(s):
            s += sgl.user("Say hi.") + sgl.assistant(sgl.gen("answer", max_tokens=4))

        state = ok(hello.run(backend=runtime, temperature=0))
        assert isinstance(state["answer"], str)
        answer = json.loads(runtime.generate("Hello", {"max_new_tokens": 3, "temperature": 0}))
        assert set(answer) == {"text", "meta_info"}
        assert answer["meta_info"]["completion_tokens"] <= 3
    finally:
        runtime.shutdown()
    llm = sgl.Engine(model_path=str(engine.model_path))
    with llm:
        outputs = llm.generate(["One,", "A,"], {"max_new_tokens": 3, "temperature": 0})
        assert [set(o) for o in outputs] == [{"text", "meta_info"}] * 2
        pieces = list(llm.generate("Count: 1, 2,", {"max_new_tokens": 6}, stream=True))
        assert pieces[-1]["text"].startswith(pieces[0]["text"])
        scored = llm.generate("The", {"max_new_tokens": 1}, return_logprob=True)
        assert math.isfinite(scored["meta_info"]["output_token_logprobs"][0][0])


def test_get_server_info_names_the_tokenizer(engine):
    info = sgl.get_server_info()
    assert info["tokenizer_path"] == str(engine.model_path)
    assert engine.model_info["model_path"] == str(engine.model_path)
    assert re.search(r"\.gguf$", info["model_path"])
