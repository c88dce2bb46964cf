"""The OpenAI backend: end to end on a real llama.cpp server (marked ``model``), and against
small OpenAI-shaped stubs for the vLLM and plain ("none") dialects."""

from __future__ import annotations

import json
import logging
import re
import threading

import pytest
from sglang_stub import StubServer, fake_logprob, tokenize

from sglrun.backends.common import match_choice
from sglrun.backends.openai import OpenAI, guess_is_chat_model
from sglrun.backends.openai_dialects import choices_gbnf, regex_to_gbnf
from sglrun.errors import InvalidArgumentError, ServerError, UnsupportedCapabilityError
from sglrun.lang.backend import GenerateRequest, ImageData, SelectRequest
from sglrun.lang.choices import token_length_normalized, unconditional_likelihood_normalized
from sglrun.lang.ir import REGEX_FLOAT, REGEX_INT, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHATML = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SCHEMA = ('{"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, '
          '"required": ["city"], "additionalProperties": false}')


def P(**kw):
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_new_tokens", 12)
    return SamplingParams.defaults(**kw)


def chat_request(role_text="", messages=QUESTION, **kw):
    return GenerateRequest(prompt="", params=P(**kw), messages=list(messages),
                           role="assistant", role_text=role_text)


def sel(choices, method=token_length_normalized, prompt="", messages=(), role=None):
    return SelectRequest(prompt=prompt, choices=choices, temperature=0.0, choices_method=method,
                         messages=list(messages), role=role)


# ------------------------------------------------------------ real llama.cpp server
@pytest.fixture(scope="module")
def chat(llamacpp_server):
    return OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=True)


@pytest.fixture(scope="module")
def completion(llamacpp_server):
    return OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=False)


@pytest.mark.model
def test_llamacpp_is_detected(chat):
    assert chat.dialect == "llamacpp"
    assert chat.api_prefix == "/v1"
    assert chat.get_chat_template().name == "chatgpt"


@pytest.mark.model
def test_auto_concurrency_is_two_programs_per_reported_slot(chat):
    from sglrun.lang.scheduler import auto_concurrency

    assert auto_concurrency(chat) == 8  # the test server runs 4 slots


def test_chat_generate_and_usage(chat):
    before = chat.token_usage.prompt_tokens, chat.token_usage.completion_tokens
    result = chat.generate(chat_request(max_new_tokens=6))
    assert isinstance(result.text, str) and result.text
    meta = result.meta_info
    assert meta["prompt_tokens"] > 10 and 1 <= meta["completion_tokens"] <= 6
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert chat.token_usage.prompt_tokens == before[0] + meta["prompt_tokens"]
    assert chat.token_usage.completion_tokens == before[1] + meta["completion_tokens"]


@pytest.mark.model
def test_completion_mode_with_stop(completion):
    result = completion.generate(GenerateRequest(prompt=CHATML, params=P(stop=[" is"],
                                                                         max_new_tokens=24)))
    assert " is" not in result.text and result.text.strip()
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": None}


@pytest.mark.model
def test_stream_chat_and_completion(chat, completion):
    chunks: list[str] = []
    result = chat.generate(chat_request(max_new_tokens=8), on_chunk=chunks.append)
    assert len(chunks) >= 2 and "".join(chunks) == result.text
    assert result.meta_info["completion_tokens"] == 8
    chunks.clear()
    result = completion.generate(GenerateRequest(prompt=CHATML, params=P(max_new_tokens=6)),
                                 on_chunk=chunks.append)
    assert len(chunks) >= 2 and "".join(chunks) == result.text
    assert completion.stats.retries == 0  # the connection is reusable after each stream


@pytest.mark.model
def test_assistant_prefill_is_continued_not_repeated(chat):
    prefill = "The capital of France is"
    result = chat.generate(chat_request(role_text=prefill, max_new_tokens=4))
    assert not result.text.startswith(prefill) and "Paris" in result.text
    chunks: list[str] = []
    streamed = chat.generate(chat_request(role_text=prefill, max_new_tokens=4),
                             on_chunk=chunks.append)
    assert not streamed.text.startswith(prefill) and "".join(chunks) == streamed.text


@pytest.mark.model
def test_n_samples(chat, completion):
    result = chat.generate(chat_request(n=3, temperature=1.0, max_new_tokens=4))
    assert isinstance(result.text, list) and len(result.text) == 3
    assert len(result.meta_info["finish_reasons"]) == 3
    result = completion.generate(GenerateRequest(prompt=CHATML, params=P(n=2, max_new_tokens=3)))
    assert isinstance(result.text, list) and len(result.text) == 2


@pytest.mark.model
def test_json_schema_chat_and_completion(chat, completion):
    data = json.loads(chat.generate(chat_request(json_schema=SCHEMA, max_new_tokens=30)).text)
    assert isinstance(data["city"], str)
    text = completion.generate(GenerateRequest(prompt=CHATML, params=P(
        json_schema=SCHEMA, max_new_tokens=30))).text
    assert isinstance(json.loads(text)["city"], str)


@pytest.mark.model
@pytest.mark.parametrize("regex", [r"(yes|no), [0-9]{2}", r"[A-Z][a-z]{1,10} is [a-z]{3,8}\.",
                                   r"\d{3}-\d{4}"])
def test_regex_through_grammar(chat, regex):
    text = chat.generate(chat_request(regex=regex, max_new_tokens=40)).text
    assert re.fullmatch(regex, text), text


@pytest.mark.model
def test_dtype_int_and_float(chat, completion):
    text = chat.generate(chat_request(dtype="int", max_new_tokens=8)).text
    assert re.fullmatch(REGEX_INT, text) and int(text.strip()) is not None
    text = completion.generate(GenerateRequest(prompt=CHATML + "Pi is about ",
                                               params=P(dtype=float, max_new_tokens=8))).text
    assert re.fullmatch(REGEX_FLOAT, text) and float(text) is not None


@pytest.mark.model
def test_select_on_chat_model_scores_choices(chat):
    request = sel(["Berlin", "Paris", "London"], messages=QUESTION, role="assistant")
    decision = chat.select(request)
    assert decision.decision == "Paris"
    assert decision.meta_info["strategy"] == "logprobs"
    assert [len(t) >= 1 for t in decision.meta_info["input_token_logprobs"]] == [True] * 3
    constrained = OpenAI("smollm2", base_url=chat.transport.pool.urls[0], is_chat_model=True,
                         select_strategy="constrained")
    decision = constrained.select(request)
    assert decision.decision in request.choices
    assert decision.meta_info["strategy"] == "constrained" and decision.meta_info["match"] == \
        "exact"


@pytest.mark.model
def test_select_on_completion_model(completion):
    prompt = CHATML + "The capital of France is"
    choices = [" London", " Paris", " Berlin"]
    decision = completion.select(sel(choices, prompt=prompt))
    assert decision.decision == " Paris"
    logprobs = decision.meta_info["normalized_prompt_logprobs"]
    assert logprobs[1] > logprobs[0] and all(v < 0 for v in logprobs)
    decision = completion.select(sel(choices, unconditional_likelihood_normalized, prompt=prompt))
    assert decision.decision in choices
    assert len(decision.meta_info["normalized_unconditional_prompt_logprobs"]) == 3
    # token healing: the prompt's trailing space merges into the choice's first token
    decision = completion.select(sel(["Paris", "London"], prompt=prompt + " "))
    assert decision.decision == "Paris"


@pytest.mark.model
def test_server_errors_surface_the_server_message(llamacpp_server):
    bad_grammar = OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=True,
                         extra_body={"grammar": "root ::= [0-9"})
    with pytest.raises(ServerError) as info:
        bad_grammar.generate(chat_request())
    assert info.value.status == 400 and "failed to parse grammar" in info.value.server_message
    assert bad_grammar.stats.retries == 0
    bad_param = OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=False,
                       extra_body={"max_tokens": "many"})
    with pytest.raises(ServerError, match="max_tokens") as info:
        bad_param.generate(GenerateRequest(prompt="Hi", params=P()))
    assert info.value.status == 400


@pytest.mark.model
def test_unsupported_on_llamacpp(chat, completion):
    with pytest.raises(UnsupportedCapabilityError, match="stop_regex is not supported"):
        chat.generate(chat_request(stop_regex=[r"\d"]))
    request = GenerateRequest(prompt="Look", params=P(), images=[ImageData("a.png", "QUJD")])
    with pytest.raises(UnsupportedCapabilityError, match="images"):
        completion.generate(request)
    with pytest.raises(UnsupportedCapabilityError, match="by the OpenAI backend") as info:
        chat.generate(chat_request(regex=r"(a)\1"))
    assert re.search("back-?reference", str(info.value)) and "\n" not in str(info.value)


@pytest.mark.model
def test_concurrent_usage_is_counted_exactly(llamacpp_server):
    backend = OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=True)
    metas: list[dict] = []

    def work():
        metas.append(backend.generate(chat_request(max_new_tokens=3)).meta_info)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(metas) == 6
    assert backend.token_usage.prompt_tokens == sum(m["prompt_tokens"] for m in metas)
    assert backend.token_usage.completion_tokens == sum(m["completion_tokens"] for m in metas)


# --------------------------------------------------------- OpenAI-shaped stub servers
class OpenAIStub(StubServer):
    """Answers like an OpenAI-compatible server owned by ``owner``; ``reply`` is the text."""

    def __init__(self, owner: str) -> None:
        super().__init__()
        self.owner = owner
        self.reply = "Paris."

    def route(self, handler, method, path, body):
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if path == "/v1/models":
            handler.send_json(200, {"object": "list", "data": [
                {"id": "m", "object": "model", "owned_by": self.owner}]})
        elif path == "/v1/chat/completions":
            handler.send_json(200, {"id": "c1", "object": "chat.completion", "usage": usage,
                                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                        "role": "assistant", "content": self.reply}}]})
        elif path == "/v1/completions" and body.get("echo"):
            choices = []
            for index, prompt in enumerate(body["prompt"]):
                tokens = tokenize(prompt) + [" the"]
                offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
                values = [None] + [fake_logprob(t, tokens[:i]) for i, t in
                                   enumerate(tokens) if i]
                choices.append({"index": index, "text": prompt + " the", "finish_reason":
                                "length", "logprobs": {"tokens": tokens, "token_logprobs":
                                                       values, "text_offset": offsets}})
            handler.send_json(200, {"id": "e1", "choices": choices, "usage": usage})
        elif path == "/v1/completions":
            handler.send_json(200, {"id": "p1", "usage": usage, "choices": [
                {"index": 0, "text": self.reply, "finish_reason": "length"}]})
        else:
            handler.send_json(404, {"error": {"message": "File Not Found"}})


@pytest.fixture(scope="module")
def vllm():
    server = OpenAIStub("vllm")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain():
    server = OpenAIStub("openai")
    yield server
    server.stop()


def test_vllm_dialect_parameters(vllm):
    backend = OpenAI("m", base_url=vllm.url, is_chat_model=False, extra_body={"seed": 3})
    assert backend.dialect == "vllm"
    backend.generate(GenerateRequest(prompt="x", params=P(
        regex="[0-9]+", stop_token_ids=[2], min_new_tokens=1, top_k=5, min_p=0.1,
        ignore_eos=True, stop=["\n"])))
    body = vllm.posted("/v1/completions")[-1]
    assert body["guided_regex"] == "[0-9]+" and body["stop_token_ids"] == [2]
    assert (body["min_tokens"], body["top_k"], body["min_p"], body["ignore_eos"]) == (
        1, 5, 0.1, True)
    assert body["stop"] == ["\n"] and body["seed"] == 3 and body["max_tokens"] == 12
    backend.generate(GenerateRequest(prompt="x", params=P(json_schema=SCHEMA)))
    assert vllm.posted("/v1/completions")[-1]["guided_json"] == json.loads(SCHEMA)


def test_vllm_chat_select_prefill_and_images(vllm):
    backend = OpenAI("m", base_url=vllm.url + "/v1", is_chat_model=True)
    decision = backend.select(sel(["Paris", "Rome"], messages=QUESTION, role="assistant"))
    assert decision.decision == "Paris" and decision.meta_info["strategy"] == "constrained"
    assert vllm.posted("/v1/chat/completions")[-1]["guided_choice"] == ["Paris", "Rome"]
    image = ImageData("a.png", "QUJD", "image/png")
    request = chat_request(role_text="It is")
    request.images = [image]
    backend.generate(request)
    body = vllm.posted("/v1/chat/completions")[-1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "It is"}
    assert body["messages"][0]["content"][1] == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}


def test_echo_scoring_select_on_completion_model(vllm):
    backend = OpenAI("m", base_url=vllm.url, is_chat_model=False)
    prompt = "I saw an elephant. Answer:"
    decision = backend.select(sel([" cat", " elephant"], prompt=prompt))
    assert decision.decision == " elephant"
    body = vllm.posted("/v1/completions")[-1]
    assert body["echo"] is True and body["prompt"] == [prompt + " cat", prompt + " elephant"]
    assert decision.meta_info["input_token_logprobs"] == [[[-1.5, None, " cat"]],
                                                          [[-1.0, None, " elephant"]]]


def test_plain_dialect_capabilities(plain, caplog):
    backend = OpenAI("gpt-4o", base_url=plain.url, api_key="sk-plain-secret-1")
    assert backend.is_chat_model and backend.dialect == "none"
    assert plain.requests[-1]["headers"]["Authorization"] == "Bearer sk-plain-secret-1"
    with pytest.raises(UnsupportedCapabilityError) as info:
        backend.generate(chat_request(regex="[0-9]+"))
    assert str(info.value).startswith("regex is not supported by the OpenAI backend:")
    assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedCapabilityError, match="assistant prefill"):
        backend.generate(chat_request(role_text="Sure,"))
    with pytest.raises(UnsupportedCapabilityError, match="stop_token_ids"):
        backend.generate(chat_request(stop_token_ids=[1]))
    with pytest.raises(InvalidArgumentError):
        backend.generate(chat_request(regex="a", json_schema=SCHEMA))
    body = plain.posted("/v1/chat/completions")
    assert body == []  # nothing was sent for refused requests
    caplog.set_level(logging.WARNING, logger="sglrun.backends")
    result = backend.generate(chat_request(top_k=5, json_schema=SCHEMA))
    assert result.text == "Paris." and "top_k=5 is ignored" in caplog.text
    body = plain.posted("/v1/chat/completions")[-1]
    assert "top_k" not in body and body["response_format"]["json_schema"]["schema"] == \
        json.loads(SCHEMA)
    completion = OpenAI("gpt-3.5-turbo-instruct", base_url=plain.url)
    assert not completion.is_chat_model
    with pytest.raises(UnsupportedCapabilityError, match="json_schema"):
        completion.generate(GenerateRequest(prompt="x", params=P(json_schema=SCHEMA)))
    assert "sk-plain-secret-1" not in repr(backend) + caplog.text


def test_plain_chat_select_by_generation(plain):
    backend = OpenAI("gpt-4o", base_url=plain.url)
    decision = backend.select(sel(["London", "Paris"], messages=QUESTION, role="assistant"))
    assert decision.decision == "Paris"
    assert decision.meta_info == {"strategy": "generate", "text": "Paris.", "match":
                                  "normalized"}
    body = plain.posted("/v1/chat/completions")[-1]
    assert "guided_choice" not in body and "grammar" not in body


def test_api_key_rules(monkeypatch, plain):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("SGLRUN_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InvalidArgumentError, match="OPENAI_API_KEY"):
        OpenAI("gpt-4o")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-99")
    backend = OpenAI("gpt-4o", base_url=plain.url, constraint_dialect="none")
    backend.generate(chat_request())
    assert plain.requests[-1]["headers"]["Authorization"] == "Bearer sk-from-env-99"
    with pytest.raises(InvalidArgumentError):
        OpenAI("gpt-4o", base_url=plain.url, constraint_dialect="tgi")


def test_guess_is_chat_model():
    assert guess_is_chat_model("gpt-4o") and guess_is_chat_model("o1-mini")
    assert guess_is_chat_model("gpt-3.5-turbo")
    assert not guess_is_chat_model("gpt-3.5-turbo-instruct")
    assert not guess_is_chat_model("davinci-002")


def test_regex_to_gbnf_names_this_backend_and_refuses_what_no_grammar_can_do():
    # The conversion itself is the embedded engine's (tests/backends/test_grammar.py), and
    # llama.cpp's server enforcing it is tested against the real server above.
    assert regex_to_gbnf(r"(yes|no), [0-9]{2}").startswith("root ::= ")
    for bad in [r"(a)\1", r"(?=a)b", r"\bx"]:
        with pytest.raises(UnsupportedCapabilityError, match="OpenAI backend"):
            regex_to_gbnf(bad)
    assert choices_gbnf(['say "hi"', "a\nb"]) == r'root ::= "say \"hi\"" | "a\nb"'


def test_match_choice():
    assert match_choice("Paris", ["Paris", "Rome"])[0] == "Paris"
    assert match_choice(" paris. ", ["Paris", "Rome"])[1]["match"] == "normalized"
    assert match_choice("Rome is the answer", ["Ro", "Rome"])[0] == "Rome"
    choice, how = match_choice("Parris", ["Rome", "Paris"])
    assert choice == "Paris" and how["match"] == "closest"


def test_dialect_is_asked_again_after_server_errors(vllm):
    vllm.clear()
    vllm.fail("/v1/models", status=503)
    vllm.fail("/props", status=503)
    backend = OpenAI("m", base_url=vllm.url, is_chat_model=False, retries=0)
    assert backend.dialect == "none"  # the server was failing: not remembered
    assert backend.dialect == "vllm"
    assert len(vllm.requests) == 3
    assert backend.dialect == "vllm" and len(vllm.requests) == 3  # now cached


@pytest.mark.model
def test_run_batch_on_the_hub_against_llamacpp(completion):
    """run_batch on the OpenAI backend runs programs as hub tasks: requests are sent from
    worker threads, constraints and select still hold."""
    import sglrun as sgl

    senders: set[int] = set()
    send = completion.transport._send

    def recording_send(*args, **kwargs):
        senders.add(threading.get_ident())
        return send(*args, **kwargs)

    @sgl.function
    def row(s, i):
        s += f"Item {i}. A number:" + sgl.gen("n", max_tokens=6, regex=r" [0-9]{1,3}")
        s += "\nGood?" + sgl.select("ok", choices=[" yes", " no"])

    completion.transport._send = recording_send
    try:
        states = row.run_batch([{"i": i} for i in range(6)], backend=completion, temperature=0)
    finally:
        completion.transport._send = send
    assert [s.error() for s in states] == [None] * 6
    assert all(re.fullmatch(r" [0-9]{1,3}", s["n"]) for s in states)
    assert all(s["ok"] in (" yes", " no") for s in states)
    assert senders and threading.get_ident() not in senders
