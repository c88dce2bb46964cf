"""The Anthropic backend against the Messages API stub."""

from __future__ import annotations

import logging

import pytest
from anthropic_stub import PREFILL_REPLY, AnthropicStub, error_body

from sglrun.backends.anthropic import Anthropic
from sglrun.errors import InvalidArgumentError, ServerError, UnsupportedCapabilityError
from sglrun.lang.backend import GenerateRequest, ImageData, SelectRequest
from sglrun.lang.choices import token_length_normalized
from sglrun.lang.ir import SamplingParams

KEY = "ant-test-key"
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me the answer"},
]


@pytest.fixture(scope="module")
def stub():
    server = AnthropicStub(api_key=KEY)
    yield server
    server.stop()


@pytest.fixture
def claude(stub):
    stub.clear()
    stub.reply = None
    stub.stream_error = None
    return Anthropic("claude-test", api_key=KEY, base_url=stub.url, retries=3)


def request(role_text="", messages=CONVERSATION, **params):
    return GenerateRequest(prompt="", params=SamplingParams.defaults(**params),
                           messages=list(messages), role="assistant", role_text=role_text)


def test_auto_concurrency_is_modest_for_a_rate_limited_api(claude):
    from sglrun.lang.scheduler import auto_concurrency

    assert auto_concurrency(claude) == 16


def test_request_shape_and_usage(stub, claude):
    result = claude.generate(request(max_new_tokens=50, temperature=0.2, top_k=5,
                                     stop=["zzz"]))
    assert result.text == "You said: Tell me the answer"
    sent = stub.requests[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == KEY
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    body = sent["body"]
    assert body["system"] == "You are terse."
    assert body["messages"] == [{"role": "user", "content": "Tell me the answer"}]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_k"]) == (
        "claude-test", 50, 0.2, 5)
    assert body["stop_sequences"] == ["zzz"] and "top_p" not in body
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": None}
    assert result.meta_info["prompt_tokens"] == 7  # 3 system words + 4 user words
    assert result.meta_info["completion_tokens"] == 6
    assert (claude.token_usage.prompt_tokens, claude.token_usage.completion_tokens) == (7, 6)
    claude.generate(request(top_p=0.5))
    body = stub.requests[-1]["body"]
    assert body["top_p"] == 0.5 and "temperature" not in body


def test_prefill_is_continued_without_trailing_whitespace(stub, claude):
    result = claude.generate(request(role_text="The answer is "))
    body = stub.requests[-1]["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert result.text == PREFILL_REPLY.lstrip()  # the space is already in the program's text
    plain = claude.generate(request(role_text="The answer is"))
    assert plain.text == PREFILL_REPLY


def test_stream_events(stub, claude):
    chunks: list[str] = []
    result = claude.generate(request(role_text="So: "), on_chunk=chunks.append)
    assert stub.requests[-1]["body"]["stream"] is True
    assert "".join(chunks) == result.text == PREFILL_REPLY.lstrip()
    assert chunks == ["42,", " as", " everyone", " knows."]
    meta = result.meta_info
    assert meta["finish_reason"] == {"type": "stop", "matched": None}
    assert meta["completion_tokens"] == 4 and meta["prompt_tokens"] == 8


def test_stop_sequences_and_max_tokens(stub, claude):
    stub.reply = "alpha beta gamma delta"
    result = claude.generate(request(stop=[" gamma"]))
    assert result.text == "alpha beta"
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": " gamma"}
    result = claude.generate(request(max_new_tokens=2))
    assert result.text == "alpha beta"
    assert result.meta_info["finish_reason"] == {"type": "length", "length": 2}
    chunks: list[str] = []
    result = claude.generate(request(stop=[" delta"]), on_chunk=chunks.append)
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": " delta"}


def test_n_asks_n_times(stub, claude):
    result = claude.generate(request(n=3))
    assert result.text == ["You said: Tell me the answer"] * 3
    assert len(stub.posted("/v1/messages")) == 3
    assert result.meta_info["completion_tokens"] == 18


def test_server_errors_keep_their_message_and_are_not_retried(stub, claude):
    bad = Anthropic("claude-nope", api_key=KEY, base_url=stub.url)
    with pytest.raises(ServerError) as info:
        bad.generate(request())
    assert info.value.status == 404 and info.value.server_message == "model: claude-nope"
    assert bad.stats.retries == 0
    wrong = Anthropic("claude-test", api_key="ant-wrong-key-777", base_url=stub.url)
    with pytest.raises(ServerError, match="invalid x-api-key") as info:
        wrong.generate(request())
    assert info.value.status == 401
    assert "ant-wrong-key-777" not in str(info.value) + repr(wrong) + repr(wrong.transport)


def test_overloaded_and_rate_limited_are_retried(stub, claude):
    stub.fail("/v1/messages", status=529, body=error_body("overloaded_error", "Overloaded"))
    stub.fail("/v1/messages", status=429, retry_after=0.3,
              body=error_body("rate_limit_error", "slow down"))
    assert claude.generate(request()).text.startswith("You said")
    assert claude.stats.retries == 2
    times = [r["time"] for r in stub.requests]
    assert times[2] - times[1] >= 0.28  # Retry-After honoured
    stub.fail("/v1/messages", times=5, status=529,
              body=error_body("overloaded_error", "Overloaded"))
    with pytest.raises(ServerError, match="Overloaded") as info:
        Anthropic("claude-test", api_key=KEY, base_url=stub.url, retries=1).generate(request())
    assert info.value.status == 529


def test_error_event_in_stream(stub, claude):
    stub.stream_error = error_body("overloaded_error", "Overloaded mid-stream")
    chunks: list[str] = []
    with pytest.raises(ServerError, match="Overloaded mid-stream") as info:
        claude.generate(request(), on_chunk=chunks.append)
    assert info.value.status == 529 and chunks == ["You"]


@pytest.mark.parametrize("params, capability", [
    ({"regex": "[0-9]+"}, "regex"),
    ({"dtype": int}, "dtype"),
    ({"stop_regex": ["x"]}, "stop_regex"),
    ({"return_logprob": True}, "return_logprob"),
])
def test_unsupported_capabilities_fail_in_one_line(stub, claude, params, capability):
    with pytest.raises(UnsupportedCapabilityError) as info:
        claude.generate(request(**params))
    assert str(info.value).startswith(f"{capability} is not supported by the Anthropic backend")
    assert "\n" not in str(info.value) and stub.requests == []


def test_ignored_knobs_warn_once(stub, claude, caplog):
    caplog.set_level(logging.WARNING, logger="sglrun.backends")
    claude.generate(request(frequency_penalty=0.5))
    claude.generate(request(frequency_penalty=0.5))
    assert caplog.text.count("frequency_penalty=0.5 is ignored") == 1
    assert "frequency_penalty" not in stub.requests[-1]["body"]


def test_select_by_generation(stub, claude):
    stub.reply = "Paris."
    decision = claude.select(SelectRequest(
        prompt="", choices=["London", "Paris"], temperature=0.0,
        choices_method=token_length_normalized, messages=list(CONVERSATION), role="assistant"))
    assert decision.decision == "Paris" and decision.meta_info["strategy"] == "generate"
    assert stub.requests[-1]["body"]["temperature"] == 0.0


def test_images_become_base64_blocks(stub, claude):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]}]
    req = request(messages=messages)
    req.images = [ImageData("a.png", "QUJD", "image/png"), ImageData("b.jpg", "REVG")]
    claude.generate(req)
    content = stub.requests[-1]["body"]["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "QUJD"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                     "data": "REVG"}},
    ]


def test_plain_prompt_and_gen_outside_assistant(stub, claude):
    result = claude.generate(GenerateRequest(prompt="Hi there", params=SamplingParams.defaults()))
    assert result.text == "You said: Hi there"
    with pytest.raises(UnsupportedCapabilityError, match="gen inside a user turn"):
        claude.generate(GenerateRequest(prompt="", params=SamplingParams.defaults(),
                                        messages=[], role="user", role_text="Hi"))


def test_key_from_environment(stub, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert Anthropic("claude-test", base_url=stub.url).generate(request()).text
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(InvalidArgumentError, match="ANTHROPIC_API_KEY"):
        Anthropic("claude-test", base_url=stub.url)
    assert Anthropic("claude-test", api_key=KEY).get_chat_template().name == "claude"


def test_run_batch_on_the_hub(claude):
    import sglrun as sgl

    @sgl.function
    def turn(s, i):
        s += sgl.user(f"Question {i}")
        s += sgl.assistant(sgl.gen("answer", max_tokens=8))

    states = turn.run_batch([{"i": i} for i in range(6)], backend=claude)
    assert [s.error() for s in states] == [None] * 6
    assert all(s["answer"] for s in states)
