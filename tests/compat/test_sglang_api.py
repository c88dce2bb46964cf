"""SGLang's API surface under ``import sglang``: module paths, names, reprs and the rules
programs depend on, checked without a model (a custom ``BaseBackend`` answers)."""

from __future__ import annotations

import asyncio
import json
import re
from enum import Enum

import pytest
import sglang as sgl
from pydantic import BaseModel
from sglang.global_config import global_config as old_global_config
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.backend.runtime_endpoint import Runtime, RuntimeEndpoint
from sglang.lang.chat_template import get_chat_template
from sglang.lang.choices import ChoicesDecision, token_length_normalized
from sglang.lang.global_config import global_config
from sglang.lang.interpreter import ProgramState, ProgramStateGroup, StreamExecutor
from sglang.lang.ir import REGEX_INT, SglFunction, SglGen, SglSamplingParams, SglSeparateReasoning
from sglang.lang.tracer import extract_prefix_by_tracing
from sglang.srt.constrained import build_regex_from_object
from sglang.srt.constrained.outlines_backend import build_regex_from_object as from_outlines
from sglang.utils import dump_state_text, read_jsonl

import sglrun


class Counting(BaseBackend):
    """A custom backend written as SGLang's are: it reads ``s.text_`` and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def get_model_name(self) -> str:
        return "counting"

    def generate(self, s, sampling_params):
        self.calls += 1
        return f"<{len(s.text_)}>", {"max_new_tokens": sampling_params.max_new_tokens}

    def select(self, s, choices, temperature, choices_method=None):
        self.calls += 1
        return ChoicesDecision(choices[-1], {"from": "counting"})


@pytest.fixture
def counting():
    backend = Counting()
    sgl.set_default_backend(backend)
    yield backend
    sgl.set_default_backend(None)


def test_the_alias_gives_sglruns_own_objects():
    assert sgl.function is sglrun.function and sgl.gen is sglrun.gen
    assert global_config is old_global_config is sglrun.global_config
    assert sgl.global_config is global_config  # a child module never hides the object
    assert SglSamplingParams is sglrun.lang.ir.SamplingParams
    assert SglFunction is type(sgl.function(lambda s: None))
    assert ProgramState is sglrun.ProgramState and ProgramStateGroup is sglrun.ProgramStateGroup
    assert RuntimeEndpoint is sglrun.RuntimeEndpoint and Runtime is sglrun.Runtime
    assert build_regex_from_object is from_outlines
    assert REGEX_INT == r"[-+]?[0-9]+[ \n]*"
    assert get_chat_template("chatml").role_prefix_and_suffix["user"][0].startswith("<|im_start|>")
    assert sglrun.lang.ir.__spec__.name == "sglrun.lang.ir"  # untouched under its own name
    import sglrun.lang.backend as contract

    assert contract.Backend is sglrun.lang.backend.Backend  # not replaced by sglang.lang.backend
    for name in ("Runtime", "Engine", "RuntimeEndpoint", "OpenAI", "Anthropic", "function",
                 "gen_int", "gen_string", "separate_reasoning", "flush_cache", "get_server_info",
                 "greedy_token_selection", "unconditional_likelihood_normalized"):  # fmt: skip
        assert callable(getattr(sgl, name)), name


def test_a_custom_base_backend_runs_programs(counting):
    @sgl.function
    def prog(s, q):
        s += q + sgl.gen("a", max_tokens=7) + sgl.select("b", choices=["x", "y"])

    state = prog.run("hello")
    assert state["a"] == "<5>" and state["b"] == "y"
    assert state.get_meta_info("a")["max_new_tokens"] == 7
    assert counting.calls == 2


def test_str_of_a_state_is_its_text_and_run_raises_the_programs_exception(counting):
    @sgl.function
    def fails(s):
        s += "Q" + sgl.gen("a")
        raise IndexError("list index out of range")

    @sgl.function
    def fine(s):
        s += "Q" + sgl.gen("a")

    state = fine.run()
    assert str(state) == "ProgramState(Q<1>)"
    assert str(state)[len("ProgramState(") : -1] == state.text()  # as cot_decoding slices it
    with pytest.raises(IndexError):
        fails.run()
    rows = fails.run_batch([{}, {}])  # batches keep one error per row (sglrun's choice)
    assert all(isinstance(row.error(), IndexError) for row in rows)


def test_not_streaming_text_iter_yields_the_value_itself(counting):
    @sgl.function
    def forked(s):
        forks = s.fork(2)
        forks += sgl.gen("v")
        forks.join()

    state = forked.run()
    assert list(state.text_iter("v")) == [["<0>", "<0>"]]

    async def collect():
        return [x async for x in state.text_async_iter("v", return_meta_data=True)]

    assert asyncio.run(collect()) == [["<0>", "<0>"]]


def test_fork_takes_any_integer_type_and_set_default_backend_none(counting):
    class NumpyLikeInt:  # np.int64 and friends implement __index__
        def __index__(self) -> int:
            return 2

    @sgl.function
    def forked(s):
        forks = s.fork(NumpyLikeInt())
        forks += sgl.gen("v")
        forks.join()

    assert len(forked.run()["v"]) == 2
    sgl.set_default_backend(None)
    assert global_config.default_backend is None


def test_stream_executor_view_shows_variables_and_events(counting):
    @sgl.function
    def prog(s):
        s += sgl.separate_reasoning(sgl.gen("answer"), model_type="deepseek-r1")

    state = prog.run()
    view = state.stream_executor
    assert isinstance(view, StreamExecutor)
    assert set(view.variable_event.keys()) == {"answer", "answer_reasoning_content"}
    assert view.variable_event["answer"].is_set() and view.variable_event["answer"].wait(1)
    assert view.variables["answer"] == "<0>" and view.text_ == state.text()
    assert view.is_finished and view.error_ is None


def test_separate_reasoning_repr_and_names_as_sglang():
    expr = sgl.separate_reasoning(sgl.gen("test_var"), model_type="deepseek-r1")
    assert len(expr.expr_list) == 2 and isinstance(expr.expr_list[0], SglGen)
    node = expr.expr_list[1]
    assert isinstance(node, SglSeparateReasoning)
    expected = "SeparateReasoning(model_type=deepseek-r1, name=test_var_reasoning_content)"
    assert repr(node) == expected
    assert node.process_name_for_reasoning("test") == "test_reasoning_content"
    wrapped = SglSeparateReasoning("qwen3", sgl.assistant(sgl.gen("y")))
    assert wrapped.name == "y_reasoning_content"
    with pytest.raises(TypeError):  # an unnamed gen has no variable to split
        sgl.separate_reasoning(sgl.gen(), model_type="qwen3")


def test_trace_gives_a_tracer_state_and_rejects_fstrings_of_arguments(counting):
    @sgl.function
    def few_shot_qa(s, question):
        s += "The following are questions with answers.\n\n"
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", stop="\n")

    @sgl.function
    def wrong(s, question):
        s += f"I want to ask {question}"

    tracer = few_shot_qa.trace()
    assert "Gen('answer')" in repr(tracer.last_node)
    kinds = [type(node).__name__ for node in tracer.flatten_nodes()]
    assert kinds.count("SglArgument") == 1 and kinds[-1] == "SglGen"
    assert "%0 = " in tracer.last_node.print_graph_dfs()
    assert "{question}" in tracer.text()
    assert few_shot_qa.bind(question="Why?").trace().text().count("Why?") == 1
    with pytest.raises(TypeError):
        wrong.trace()
    assert extract_prefix_by_tracing(few_shot_qa, counting).startswith("The following are")
    assert counting.calls == 0  # tracing makes no model call


def test_precache_tracing_makes_no_model_call_even_through_nested_programs(counting):
    @sgl.function
    def inner(s, q):
        s += "Inner " + q + sgl.gen("x")

    @sgl.function
    def outer(s, q):
        s += "A long shared instruction that every row of this batch starts with, " * 2
        s += q + sgl.gen("y")
        s += inner.run(q)["x"]

    assert global_config.enable_precache_with_tracing
    states = outer.run_batch([{"q": "a"}, {"q": "b"}])
    assert all(state.error() is None for state in states)
    assert counting.calls == 4  # two calls per row, none for the dry runs


def test_server_info_and_model_info_name_the_tokenizer(counting):
    info = sgl.get_server_info()
    assert info["tokenizer_path"] == info["model_path"] == "counting"
    assert global_config.default_backend.model_info["model_path"] == "counting"


def test_global_config_has_sglangs_settings():
    for name, value in (("verbosity", 0), ("skip_special_tokens_in_output", True),
                        ("spaces_between_special_tokens_in_out", True),
                        ("enable_precache_with_tracing", True),
                        ("enable_parallel_encoding", True)):  # fmt: skip
        assert getattr(global_config, name) == value, name


class Weapon(str, Enum):
    sword = "sword"
    axe = "axe"


class Wizard(BaseModel):
    name: str
    age: int
    weapon: Weapon


def test_build_regex_from_object_matches_the_models_json():
    regex = build_regex_from_object(Wizard)
    assert re.fullmatch(regex, json.dumps({"name": "Merlin", "age": 300, "weapon": "axe"}))
    assert re.fullmatch(regex, '{"name":"Merlin","age":300,"weapon":"axe"}')
    assert not re.fullmatch(regex, json.dumps({"name": "Merlin", "age": 300, "weapon": "bow"}))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert build_regex_from_object(schema) == build_regex_from_object(json.dumps(schema))
    with pytest.raises(TypeError, match="pydantic model class, a dict or a JSON string"):
        build_regex_from_object(42)


def test_runtime_and_engine_explain_a_hugging_face_model_id():
    for factory in (sgl.Runtime, sgl.Engine):
        with pytest.raises(TypeError, match="SGLang's server.*RuntimeEndpoint"):
            factory(model_path="meta-llama/Llama-3.1-8B-Instruct")


def test_dump_state_text_and_read_jsonl(tmp_path, counting):
    @sgl.function
    def prog(s):
        s += "Hi" + sgl.gen("a")

    path = tmp_path / "states.txt"
    dump_state_text(str(path), [prog.run(), "plain"])
    text = path.read_text()
    assert "=" * 40 + " 0 " in text and "Hi<2>" in text and "plain" in text
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"q": 1}\n\n{"q": 2}\n')
    assert list(read_jsonl(str(rows))) == [{"q": 1}, {"q": 2}]


def test_choices_default_and_token_length_normalized_is_sglangs():
    select = sgl.select("x", choices=["a"])
    assert select.choices_method is token_length_normalized
