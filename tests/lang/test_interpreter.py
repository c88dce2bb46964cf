"""The language runtime on the shipped FakeBackend: mechanics, fast."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import sglrun as sgl
from sglrun.backends.fake import FakeBackend
from sglrun.errors import (
    BackendError,
    InvalidArgumentError,
    ProgramError,
    UnsupportedCapabilityError,
    VariableNotProducedError,
)


@sgl.function
def qa(s, question: str):
    s += sgl.user("Q: " + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0.3))


def test_gen_fills_variable_text_messages_and_meta():
    backend = FakeBackend(["Paris is nice"])
    state = qa.run("Capital?", backend=backend)
    assert state.error() is None
    assert state["answer"] == "Paris is nice"
    assert state.text() == "USER:Q: Capital?\nASSISTANT:Paris is nice\n"
    assert state.messages() == [
        {"role": "user", "content": "Q: Capital?"},
        {"role": "assistant", "content": "Paris is nice"},
    ]
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] == 3 and "e2e_latency" in meta
    assert "answer" in state and "nothing" not in state


def test_gen_arguments_override_run_defaults():
    backend = FakeBackend(["x"])
    qa.run("q", backend=backend, max_new_tokens=99, temperature=0.9, top_k=5)
    params = backend.calls[0].params
    assert params.max_new_tokens == 8  # gen's own value wins
    assert params.temperature == 0.3
    assert params.top_k == 5  # run default kept where gen is silent
    assert backend.calls[0].prompt == "USER:Q: q\nASSISTANT:"
    assert backend.calls[0].role == "assistant"


def test_chat_template_stop_strings_and_default_system_prompt():
    backend = FakeBackend(["hi<|im_end|>ignored"], chat_template="smollm2")
    state = qa.run("q", backend=backend, stop="END")
    request = backend.calls[0]
    assert request.params.stop == ("END", "<|im_end|>")
    assert request.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert state["answer"] == "hi"
    assert state.messages()[0]["role"] == "system"


def test_with_role_blocks_and_begin_end_forms():
    @sgl.function
    def prog(s):
        with s.system():
            s += "Be brief."
        s += sgl.user_begin() + "Hello" + sgl.user_end()
        with s.assistant():
            s += sgl.gen("reply")

    state = prog.run(backend=FakeBackend(["Hi there"]))
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert state.messages()[2]["content"] == "Hi there"


def test_nested_roles_fail_clearly():
    @sgl.function
    def prog(s):
        with s.user():
            s += sgl.assistant("nested")
        s += sgl.gen("x")

    state = prog.run(backend=FakeBackend(["never"]))
    assert isinstance(state.error(), ProgramError)
    assert "cannot nest" in str(state.error())
    with pytest.raises(VariableNotProducedError, match="'x'.*ProgramError"):
        state["x"]


def test_backend_failure_is_recorded_and_names_variable():
    backend = FakeBackend([ConnectionError("server went away")])
    state = qa.run("q", backend=backend)
    assert isinstance(state.error(), ConnectionError)
    with pytest.raises(VariableNotProducedError) as info:
        state["answer"]
    assert "'answer'" in str(info.value) and "server went away" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_program_exception_leaves_run_as_in_sglang_and_stays_in_batch_rows():
    @sgl.function
    def prog(s, n: int):
        s += sgl.gen("first")
        if n == 3:
            raise ValueError(f"bad row {n}")

    with pytest.raises(ValueError, match="bad row 3"):
        prog.run(3, backend=FakeBackend(["ok"]))
    states = prog.run_batch([{"n": 1}, {"n": 3}], backend=FakeBackend(["ok"], cycle=True))
    assert states[0].error() is None and states[0]["first"] == "ok"
    assert isinstance(states[1].error(), ValueError) and "bad row 3" in str(states[1].error())
    assert states[1]["first"] == "ok"


def test_a_backend_failure_stays_in_the_state_unless_the_program_reads_it():
    @sgl.function
    def quiet(s):
        s += sgl.gen("x")

    @sgl.function
    def reads(s):
        s += sgl.gen("x")
        s += "got " + s["x"]

    state = quiet.run(backend=FakeBackend([BackendError("down")]))
    assert isinstance(state.error(), BackendError)
    with pytest.raises(VariableNotProducedError, match="'x'"):
        reads.run(backend=FakeBackend([BackendError("down")]))


def test_reading_a_variable_nobody_produces_fails_at_once():
    state = qa.run("q", backend=FakeBackend(["a"]))
    with pytest.raises(VariableNotProducedError, match="'missing'"):
        state["missing"]


def test_wrong_names_and_types_fail_at_the_call():
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        sgl.gen("x", max_tokens="5")
    with pytest.raises(InvalidArgumentError, match="temperature"):
        sgl.gen("x", temperature=-1)
    with pytest.raises(InvalidArgumentError, match="invalid regex"):
        sgl.gen("x", regex="(unclosed")
    with pytest.raises(InvalidArgumentError, match="choices"):
        sgl.select("x", choices=[])
    with pytest.raises(InvalidArgumentError, match="unknown|unexpected|question"):
        qa.run(questoin="typo", backend=FakeBackend())
    with pytest.raises(InvalidArgumentError, match="top_p"):
        qa.run("q", top_p=5, backend=FakeBackend())
    with pytest.raises(InvalidArgumentError, match="num_threads"):
        qa.run_batch([{"question": "a"}], num_threads=0, backend=FakeBackend())
    with pytest.raises(InvalidArgumentError, match="row 1"):
        qa.run_batch([{"question": "a"}, {"nope": 1}], backend=FakeBackend())
    with pytest.raises(TypeError):
        sgl.gen("x", max_token=5)  # a misspelt keyword is Python's own TypeError


def test_select_and_choice_methods():
    for method in (
        sgl.token_length_normalized,
        sgl.greedy_token_selection,
        sgl.unconditional_likelihood_normalized,
    ):

        @sgl.function
        def prog(s, method=method):
            s += "Pick: " + sgl.select("pick", choices=["red", "green", "blue"],
                                       choices_method=method)

        backend = FakeBackend(choose=lambda request: "green")
        state = prog.run(backend=backend)
        assert state["pick"] == "green"
        assert state.text() == "Pick: green"
        meta = state.get_meta_info("pick")
        assert len(meta["normalized_prompt_logprobs"]) == 3


def test_gen_with_choices_is_a_select():
    @sgl.function
    def prog(s):
        s += sgl.gen("answer", choices=["yes", "no"])

    state = prog.run(backend=FakeBackend(choose=lambda r: "no"))
    assert state["answer"] == "no"


def test_forks_run_concurrently_and_join_gathers_lists():
    @sgl.function
    def prog(s):
        s += "Tips:"
        forks = s.fork(4)
        forks += lambda i: f"\nTip {i}:" + sgl.gen("tip", max_tokens=4)
        forks.join()
        s += "\nSummary:" + sgl.gen("summary")

    backend = FakeBackend(lambda request: "t" if request.name == "tip" else "done", delay=0.2)
    started = time.perf_counter()
    state = prog.run(backend=backend)
    elapsed = time.perf_counter() - started
    assert state.error() is None
    assert state["tip"] == ["t", "t", "t", "t"]
    assert backend.max_in_flight == 4
    assert elapsed < 0.2 * 5 - 0.3  # four forks overlap: far less than five sequential calls
    assert state["summary"] == "done"


def test_fork_reads_and_concate_and_append():
    @sgl.function
    def prog(s):
        s += "Start."
        forks = s.fork(2)
        forks += [" A" + sgl.gen("v"), " B" + sgl.gen("v")]
        values = [forks[0]["v"], forks[1]["v"]]
        forks.join("concate_and_append")
        s.set_var("values", values)

    state = prog.run(backend=FakeBackend(lambda r: "!"))
    assert state.text() == "Start. A! B!"
    assert state["values"] == ["!", "!"]


def test_fork_error_surfaces_in_parent():
    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks += sgl.gen("v")
        forks.join()

    state = prog.run(backend=FakeBackend([RuntimeError("boom"), "ok"]))
    assert isinstance(state.error(), RuntimeError)


def test_copy_and_var_scope():
    @sgl.function
    def prog(s):
        with s.var_scope("intro"):
            s += "Hello " + sgl.gen("name")
        with s.copy() as draft:
            draft += " draft:" + sgl.gen("draft")
        s += "."

    state = prog.run(backend=FakeBackend(["Ann", "scribble"]))
    assert state["intro"] == "Hello Ann"
    assert state["draft"] == ["scribble"]
    assert state.text() == "Hello Ann."


def test_run_batch_keeps_input_order_and_isolates_errors():
    @sgl.function
    def prog(s, i: int):
        if i == 3:
            raise KeyError("row three is bad")
        s += f"row {i}: " + sgl.gen("out")

    def reply(request):
        time.sleep(random.random() * 0.02)
        return request.prompt.split(":")[0]

    rows = [{"i": i} for i in range(20)]
    states = prog.run_batch(rows, backend=FakeBackend(reply), num_threads=8)
    assert [s["out"] for i, s in enumerate(states) if i != 3] == [
        f"row {i}" for i in range(20) if i != 3
    ]
    assert isinstance(states[3].error(), KeyError)
    tuples = prog.run_batch([(1,), (2,)], backend=FakeBackend(reply))
    assert [s["out"] for s in tuples] == ["row 1", "row 2"]
    lazily = prog.run_batch(rows[4:9], backend=FakeBackend(reply), generator_style=True)
    assert not isinstance(lazily, list)
    assert [s["out"] for s in lazily] == [f"row {i}" for i in range(4, 9)]


def test_stream_text_iter_yields_chunks():
    backend = FakeBackend(["one two three four"], delay=0.05)
    state = qa.run("q", backend=backend, stream=True)
    chunks = list(state.text_iter())
    assert len(chunks) >= 2
    assert "".join(chunks) == state.text()
    state = qa.run("q", backend=FakeBackend(["alpha beta gamma"], delay=0.15), stream=True)
    var_chunks = list(state.text_iter("answer"))
    assert var_chunks == ["alpha", " beta", " gamma"]
    assert state["answer"] == "alpha beta gamma"


def test_text_async_iter():
    state = qa.run("q", backend=FakeBackend(["a b c"]), stream=True)

    async def collect():
        return [piece async for piece in state.text_async_iter("answer")]

    assert "".join(asyncio.run(collect())) == "a b c"


def test_stream_error_ends_iteration():
    state = qa.run("q", backend=FakeBackend([RuntimeError("down")]), stream=True)
    list(state.text_iter())
    assert isinstance(state.error(), RuntimeError)


def test_dtype_parsing_and_n():
    @sgl.function
    def prog(s):
        s += sgl.gen_int("count") + " " + sgl.gen("many", n=3) + sgl.gen_string("word")

    state = prog.run(backend=FakeBackend(["42", "x", '"hi"']))
    assert state["count"] == 42 and isinstance(state["count"], int)
    assert state["many"] == ["x", "x", "x"]
    assert state["word"] == "hi"
    bad = prog.run(backend=FakeBackend(["forty"]))
    assert isinstance(bad.error(), ProgramError) and "not a int" in str(bad.error())


def test_bind_and_call():
    bound = qa.bind(question="bound?")
    backend = FakeBackend(["y"])
    state = bound(backend=backend)
    assert "bound?" in backend.calls[0].prompt and state["answer"] == "y"
    with pytest.raises(InvalidArgumentError):
        qa.bind(nope=1)


def test_trace_renders_prompt_without_a_model():
    state = qa.trace(question="What?")
    assert "What?" in state.text() and "{answer}" in state.text()
    assert state["answer"] == "{answer}"


def test_cache_sends_shared_prefix():
    @sgl.function
    def prog(s, doc: str):
        s += "You are a careful assistant. " * 4 + "Document: " + doc + sgl.gen("x")

    backend = FakeBackend(["a"], cycle=True)
    prog.run_batch([{"doc": "one"}, {"doc": "two"}], backend=backend)
    assert backend.cached_prefixes and backend.cached_prefixes[0].endswith("Document: ")


def test_separate_reasoning():
    @sgl.function
    def prog(s):
        with s.assistant():
            s += sgl.separate_reasoning(sgl.gen("answer"), model_type="deepseek-r1")

    state = prog.run(backend=FakeBackend(["<think>hmm</think>42"]))
    assert state["answer"] == "42"
    assert state["answer_reasoning_content"] == "hmm"


def test_images_reach_backend_and_messages(tmp_path):
    picture = tmp_path / "dot.png"
    picture.write_bytes(b"\x89PNG fake bytes")

    @sgl.function
    def prog(s, path: str):
        s += sgl.user(sgl.image(path) + "What is this?")
        s += sgl.assistant(sgl.gen("answer"))

    backend = FakeBackend(["a dot"])
    state = prog.run(str(picture), backend=backend)
    assert backend.calls[0].images[0].source == str(picture)
    parts = state.messages()[0]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_speculative_completion_mode_uses_one_call():
    @sgl.function(num_api_spec_tokens=64)
    def prog(s):
        s += "Name:" + sgl.gen("name", stop="\n") + "\nJob:" + sgl.gen("job", stop="\n")

    backend = FakeBackend([" Ann\nJob: pilot\n"])
    state = prog.run(backend=backend)
    assert state["name"] == " Ann"
    assert len(backend.calls) == 1


def test_many_threads_share_one_backend():
    backend = FakeBackend(lambda r: "x", delay=0.01)
    results: list[str] = []

    def worker():
        results.append(qa.run("q", backend=backend)["answer"])

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["x"] * 16


def test_stream_program_reading_a_missing_variable_does_not_hang():
    @sgl.function
    def prog(s):
        s += sgl.gen("a")
        s += s["never"]

    state = prog.run(backend=FakeBackend(["x"]), stream=True)
    chunks = list(state.text_iter())
    assert "".join(chunks) == "x"
    assert isinstance(state.error(), VariableNotProducedError)


def test_speculative_chat_turn_is_generated_once_and_matched():
    @sgl.function(num_api_spec_tokens=64)
    def card(s, who: str):
        s += sgl.user("Describe " + who + " as 'Name: ...' then 'Job: ...'.")
        s += sgl.assistant(
            "Name:" + sgl.gen("name", stop="\n") + "\nJob:" + sgl.gen("job", stop="\n")
        )

    backend = FakeBackend(["Name: Ann Lee\nJob: pilot\n"], is_chat_model=True)
    state = card.run("Ann", backend=backend)
    assert state.error() is None, state.error()
    assert (state["name"], state["job"]) == ("Ann Lee", "pilot")
    assert len(backend.calls) == 1
    assert backend.calls[0].role == "assistant" and backend.calls[0].params.max_new_tokens == 64
    assert state.messages()[-1] == {"role": "assistant", "content": "Name:Ann Lee\nJob:pilot"}
    assert state.get_meta_info("job")["speculative"] is True


def test_speculative_chat_turn_retries_then_degrades_to_partial_values_as_sglang(caplog):
    @sgl.function(num_api_spec_tokens=32)
    def card(s):
        s += sgl.user("Go")
        s += sgl.assistant("Name:" + sgl.gen("name") + "\nJob:" + sgl.gen("job"))

    backend = FakeBackend(["no format", "still none", "Name: Bo\nJob: cook"], is_chat_model=True)
    state = card.run(backend=backend)
    assert (state["name"], state["job"]) == ("Bo", "cook") and len(backend.calls) == 3
    assert "warning" not in state.get_meta_info("job")
    @sgl.function(num_api_spec_tokens=32)
    def card_with_stops(s):
        s += sgl.user("Go")
        s += sgl.assistant(
            "Name:" + sgl.gen("name", stop="\n") + "\nJob:" + sgl.gen("job", stop="\n")
        )

    half = FakeBackend(["Name: Bo\nAge: 3"], cycle=True, is_chat_model=True)
    degraded = card_with_stops.run(backend=half)
    assert degraded.error() is None and len(half.calls) == 3
    assert (degraded["name"], degraded["job"]) == ("Bo", "")
    assert "did not follow" in degraded.get_meta_info("job")["warning"]
    assert "did not follow the program's template" in caplog.text
    nothing = card.run(backend=FakeBackend(["x"], cycle=True, is_chat_model=True))
    assert (nothing["name"], nothing["job"]) == ("", "")


def test_speculative_state_is_per_program_under_threads():
    @sgl.function(num_api_spec_tokens=16)
    def card(s, i: int):
        s += sgl.user(f"row {i}")
        s += sgl.assistant("Id:" + sgl.gen("id", stop="\n"))

    backend = FakeBackend(
        lambda r: "Id: " + r.messages[-1]["content"].split()[1], delay=0.01, is_chat_model=True
    )
    states = card.run_batch([{"i": i} for i in range(24)], backend=backend, num_threads=8)
    assert [s["id"] for s in states] == [str(i) for i in range(24)]


# ----------------------------------------------------------------------------- capabilities


class _NoRegex(FakeBackend):
    """A backend that declares it cannot constrain by regex (as Anthropic's API cannot)."""

    capabilities = frozenset({"select"})

    def capability_hint(self, capability):
        return "no grammar here"


@sgl.function
def _typed(s, question: str):
    s += question + sgl.gen("plain", max_tokens=2) + sgl.gen("age", regex=r"[0-9]+")


def test_a_missing_capability_fails_before_its_request_with_the_backends_hint():
    backend = _NoRegex(["x"], cycle=True)
    state = _typed.run(question="q", backend=backend)
    error = state.error()
    assert isinstance(error, UnsupportedCapabilityError)
    assert "regex" in str(error) and "no grammar here" in str(error) and "'age'" in str(error)
    assert [call.name for call in backend.calls] == ["plain"]  # the regex gen never went out


def test_a_dry_run_lists_what_a_program_needs_and_what_a_backend_lacks():
    from sglrun.lang.tracing import missing_capabilities, needs_of

    assert needs_of(_typed, {"question": "q"}) == {"regex": "age"}
    assert missing_capabilities(_typed, {"question": "q"}, _NoRegex()) == [("regex", "age")]
    assert missing_capabilities(_typed, {"question": "q"}, FakeBackend()) == []
