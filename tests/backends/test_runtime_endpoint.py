"""RuntimeEndpoint against the SGLang stub: what is sent, what comes back, select's requests."""

from __future__ import annotations

import pytest
from sglang_stub import CONTINUATION, SGLangStub, fake_logprob, free_port, tokenize

from sglrun.backends.runtime_endpoint import RuntimeEndpoint
from sglrun.errors import ServerError, TransportError
from sglrun.lang.backend import GenerateRequest, ImageData, SelectRequest
from sglrun.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglrun.lang.ir import REGEX_INT, SamplingParams


@pytest.fixture(scope="module")
def stub():
    server = SGLangStub()
    yield server
    server.stop()


@pytest.fixture
def backend(stub):
    stub.clear()
    return RuntimeEndpoint(stub.url, retries=2)


def gen(prompt="Hello", **params):
    return GenerateRequest(prompt=prompt, params=SamplingParams.defaults(**params))


def sel(prompt, choices, method=token_length_normalized, **kw):
    return SelectRequest(prompt=prompt, choices=choices, temperature=0.0, choices_method=method,
                         **kw)


def test_construction_reads_model_info_and_template(stub, backend):
    assert stub.requests[0]["path"] == "/get_model_info"
    assert backend.get_model_name() == SGLangStub.model_path
    template = backend.get_chat_template()
    assert template.name != "default"  # picked from the model path
    named = RuntimeEndpoint(stub.url, chat_template_name="chatml")
    assert named.get_chat_template().name == "chatml"


def test_auto_concurrency_follows_the_servers_advertised_limit(stub, backend):
    from sglang_stub import StubServer

    from sglrun.lang.scheduler import DEFAULT_CONCURRENCY, auto_concurrency

    assert auto_concurrency(backend) == DEFAULT_CONCURRENCY  # the stub advertises none

    class Advertising(SGLangStub):
        def route(self, handler, method, path, body):
            if path == "/server_info":
                handler.send_json(200, {"max_running_requests": 48, "version": "0.5"})
            else:
                super().route(handler, method, path, body)

    assert issubclass(Advertising, StubServer)
    with Advertising() as server:
        assert auto_concurrency(RuntimeEndpoint(server.url)) == 48


def test_generate_maps_sampling_params(stub, backend):
    result = backend.generate(gen(
        "Once", max_new_tokens=4, min_new_tokens=1, stop=["zzz"], stop_token_ids=[7],
        stop_regex=[r"\d"], temperature=0.3, top_p=0.9, top_k=20, min_p=0.05,
        frequency_penalty=0.1, presence_penalty=0.2, ignore_eos=True,
    ))
    assert result.text == " the quick brown fox"
    assert result.meta_info["completion_tokens"] == 4
    assert result.meta_info["finish_reason"] == {"type": "length", "length": 4}
    body = stub.posted("/generate")[-1]
    assert body["text"] == "Once"
    assert body["sampling_params"] == {
        "max_new_tokens": 4, "min_new_tokens": 1, "n": 1, "stop": ["zzz"],
        "stop_token_ids": [7], "stop_regex": [r"\d"], "temperature": 0.3, "top_p": 0.9,
        "top_k": 20, "min_p": 0.05, "frequency_penalty": 0.1, "presence_penalty": 0.2,
        "ignore_eos": True,
    }
    assert "stream" not in body and "return_logprob" not in body


def test_stop_and_finish_reason(stub, backend):
    result = backend.generate(gen(stop=[" fox"]))
    assert result.text == " the quick brown"
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": " fox"}


def test_regex_json_schema_and_dtype(stub, backend):
    backend.generate(gen(regex=r"[0-9]+"))
    assert stub.posted("/generate")[-1]["sampling_params"]["regex"] == "[0-9]+"
    schema = '{"type": "object"}'
    assert backend.generate(gen(json_schema=schema)).text == '{"ok": true}'
    assert stub.posted("/generate")[-1]["sampling_params"]["json_schema"] == schema
    backend.generate(gen(dtype=int))
    sent = stub.posted("/generate")[-1]["sampling_params"]
    assert sent["regex"] == REGEX_INT and sent["stop"] == [" ", "\n"]


def test_logprob_fields_are_sent_and_meta_passed_through(stub, backend):
    result = backend.generate(gen("a b", max_new_tokens=2, return_logprob=True,
                                  logprob_start_len=0, top_logprobs_num=2,
                                  return_text_in_logprobs=True))
    body = stub.posted("/generate")[-1]
    assert (body["return_logprob"], body["logprob_start_len"], body["top_logprobs_num"],
            body["return_text_in_logprobs"]) == (True, 0, 2, True)
    meta = result.meta_info
    assert [e[2] for e in meta["input_token_logprobs"]] == ["a", " b"]
    assert meta["input_token_logprobs"][0][0] is None
    assert [e[2] for e in meta["output_token_logprobs"]] == [" the", " quick"]
    assert meta["output_token_logprobs"][0][0] == fake_logprob(" the", ["a", " b"])


def test_images_are_sent_as_image_data(stub, backend):
    image = ImageData(source="cat.png", base64_data="QUJD", mime_type="image/png")
    request = gen("Look:")
    request.images = [image]
    backend.generate(request)
    assert stub.posted("/generate")[-1]["image_data"] == "QUJD"
    request.images = [image, ImageData("d.jpg", "REVG")]
    backend.generate(request)
    assert stub.posted("/generate")[-1]["image_data"] == ["QUJD", "REVG"]


def test_n_samples(stub, backend):
    result = backend.generate(gen(n=3, max_new_tokens=2))
    assert result.text == [" the quick"] * 3
    assert result.meta_info["completion_tokens"] == 6
    assert len(result.meta_info["meta_info_list"]) == 3


def test_stream_delivers_deltas_of_cumulative_text(stub, backend):
    stub.stream_delay = 0.01
    chunks: list[str] = []
    try:
        result = backend.generate(
            gen("Go", max_new_tokens=20), on_chunk=lambda piece, meta=None: chunks.append(piece)
        )
    finally:
        stub.stream_delay = 0.0
    assert stub.posted("/generate")[-1]["stream"] is True
    assert chunks == tokenize(CONTINUATION)
    assert "".join(chunks) == result.text == CONTINUATION
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": None}


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
def test_stream_pieces_carry_their_own_logprobs_as_sglang_streams_them(stub, backend, incremental):
    """SGLang's test_stream_logprobs: each piece's logprobs are its own tokens'; the counts
    are cumulative; whichever way the server streams."""
    import asyncio

    import sglrun as sgl

    @sgl.function
    def qa(s):
        s += "Go" + sgl.gen("answer", return_logprob=True)

    stub.incremental, stub.stream_delay = incremental, 0.02
    try:
        state = qa.run(backend=backend, stream=True, max_new_tokens=20, temperature=0)

        async def collect():
            return [c async for c in state.text_async_iter("answer", return_meta_data=True)]

        chunks = asyncio.run(collect())
    finally:
        stub.incremental, stub.stream_delay = False, 0.0
    assert len(chunks) > 1
    before = 0
    for text, meta in chunks:
        assert text
        assert meta["completion_tokens"] == meta["output_token_logprobs_length"]
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] - before
        before = meta["completion_tokens"]
    assert "".join(text for text, _ in chunks) == state["answer"] == CONTINUATION
    assert len(state.get_meta_info("answer")["output_token_logprobs"]) == before


def test_server_error_message_surfaces(stub, backend):
    with pytest.raises(ServerError) as info:
        backend.generate(gen(max_new_tokens=-1))
    assert info.value.status == 400
    assert "max_new_tokens must be at least 0" in str(info.value)
    assert backend.stats.retries == 0


def test_select_requests_follow_sglang(stub, backend):
    prompt = "I saw an elephant today. Which animal? Answer:"
    decision = backend.select(sel(prompt, [" cat", " elephant"]))
    assert decision.decision == " elephant"  # mentioned in the prompt: likelier
    prefix, scoring = stub.posted("/generate")
    assert prefix == {"text": prompt, "sampling_params": {"max_new_tokens": 0}}
    prompt_tokens = len(tokenize(prompt))
    assert scoring["text"] == [prompt + " cat", prompt + " elephant"]
    # SGLang's list form: one value per item for each per-item option
    assert scoring["return_logprob"] == [True, True]
    assert scoring["return_text_in_logprobs"] is True
    assert scoring["logprob_start_len"] == [prompt_tokens - 2] * 2
    assert [p["max_new_tokens"] for p in scoring["sampling_params"]] == [0, 0]
    meta = decision.meta_info
    # only the choice's own token is scored, prompt tokens are dropped
    assert [[e[2] for e in tokens] for tokens in meta["input_token_logprobs"]] == [
        [" cat"], [" elephant"]]
    assert meta["normalized_prompt_logprobs"] == [-1.5, -1.0]


def test_select_without_mention_prefers_short_word(stub, backend):
    assert backend.select(sel("Pick one:", [" elephant", " cat"])).decision == " cat"


def test_select_token_healing_keeps_straddling_token(stub, backend):
    # The prompt ends in a space that merges with the choice into one token.
    decision = backend.select(sel("Answer: ", ["cat", "dog"]))
    tokens = decision.meta_info["input_token_logprobs"]
    assert [[e[2] for e in t] for t in tokens] == [[" cat"], [" dog"]]


def test_select_unconditional_uses_choice_tokens(stub, backend):
    prompt = "The rhinoceros is big. Animal:"
    choices = [" a ox", " the rhinoceros"]
    assert backend.select(sel(prompt, choices)).decision == " a ox"  # -0.75 vs -0.8125
    stub.clear()
    decision = backend.select(sel(prompt, choices, unconditional_likelihood_normalized))
    assert decision.decision == " the rhinoceros"  # mentioned: far likelier than a priori
    third = stub.posted("/generate")[2]
    assert "text" not in third
    assert third["input_ids"] == [[e[1] for e in t]
                                  for t in decision.meta_info["input_token_logprobs"]]
    assert [len(ids) for ids in third["input_ids"]] == [2, 2]
    assert decision.meta_info["normalized_unconditional_prompt_logprobs"] == [-0.25, 1.6875]


def test_select_greedy_and_multi_token_choices(stub, backend):
    decision = backend.select(sel("Say:", [" big red", " big blue"], greedy_token_selection))
    assert decision.decision == " big red"  # ties on " big", " red" is shorter than " blue"
    assert [len(t) for t in decision.meta_info["input_token_logprobs"]] == [2, 2]


def test_select_with_image_sends_image_per_choice(stub, backend):
    request = sel("See:", [" a", " b"])
    request.images = [ImageData("x.png", "QUJD")]
    backend.select(request)
    prefix, scoring = stub.posted("/generate")
    assert prefix["image_data"] == "QUJD"
    assert scoring["image_data"] == ["QUJD", "QUJD"]


def test_flush_cache_server_info_and_cache_prefix(stub, backend):
    assert backend.flush_cache() is True
    assert stub.posted("/flush_cache") == [{"empty_cache": True}]
    assert backend.get_server_info()["version"] == "0.5.0-stub"
    stub.fail("/server_info", status=404, body={"detail": "Not Found"})
    assert backend.get_server_info()["version"] == "0.4.0-stub"
    backend.cache_prefix("shared system prompt")
    assert stub.posted("/generate")[-1] == {"text": "shared system prompt",
                                            "sampling_params": {"max_new_tokens": 0}}
    backend.concatenate_and_append(["a"], "b")  # a harmless no-op


def test_api_key_header_from_argument_and_env(stub, monkeypatch):
    stub.clear()
    RuntimeEndpoint(stub.url, api_key="k-arg-123")
    assert stub.requests[-1]["headers"]["Authorization"] == "Bearer k-arg-123"
    monkeypatch.setenv("SGLRUN_API_KEY", "k-env-456")
    backend = RuntimeEndpoint(stub.url)
    assert stub.requests[-1]["headers"]["Authorization"] == "Bearer k-env-456"
    assert "k-env-456" not in repr(backend) and "k-env-456" not in repr(backend.transport)
    monkeypatch.delenv("SGLRUN_API_KEY")
    RuntimeEndpoint(stub.url)
    assert "Authorization" not in stub.requests[-1]["headers"]


def test_several_urls_and_dead_server(stub):
    dead = f"http://127.0.0.1:{free_port()}"
    stub.clear()
    backend = RuntimeEndpoint([dead, stub.url], retries=2)
    for _ in range(4):
        assert backend.generate(gen(max_new_tokens=1)).text == " the"
    assert backend.stats.retries <= 1
    with pytest.raises(TransportError):
        RuntimeEndpoint(dead, retries=0)


def test_retry_on_overload_then_success(stub, backend):
    stub.fail("/generate", status=503, retry_after=0.05)
    assert backend.generate(gen(max_new_tokens=1)).text == " the"
    assert backend.stats.retries == 1


def test_concurrent_requests_coalesce_into_list_requests(stub, backend):
    """Requests arriving while others are in flight go out together in SGLang's list form,
    each item keeping its own sampling parameters; every caller gets its own answer."""
    import threading

    from sglrun.backends.coalesce import Coalescer

    backend.coalescer = Coalescer(backend._send_items, max_in_flight=1)
    stub.fail("/generate", delay=0.3)  # the first request is slow: the others pile up
    results: dict[int, str] = {}

    def call(i: int) -> None:
        request = gen(f"row {i}:", max_new_tokens=1 + i % 3)
        results[i] = backend.generate(request).text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    posted = [body for body in stub.posted("/generate") if isinstance(body["text"], list)]
    assert posted, "no list request was sent"
    assert len(stub.posted("/generate")) < 24
    for body in posted:
        assert len(body["sampling_params"]) == len(body["text"])
        for text, params in zip(body["text"], body["sampling_params"]):
            assert params["max_new_tokens"] == 1 + int(text.split()[1][:-1]) % 3
    assert sorted(results) == list(range(24))


def test_run_batch_runs_on_the_hub_and_coalesces_into_list_requests(stub, backend):
    """run_batch on RuntimeEndpoint: programs are hub tasks whose requests go out together
    (SGLang's list form) from the I/O thread, each item with its own parameters."""
    import threading

    import sglrun as sgl

    @sgl.function
    def row(s, i):
        s += f"row {i}:" + sgl.gen("x", max_tokens=1 + i % 3)
        s += " verdict:" + sgl.select("v", choices=[" yes", " no"])

    senders: set[int] = set()
    send = backend.transport._send

    def recording_send(*args, **kwargs):
        senders.add(threading.get_ident())
        return send(*args, **kwargs)

    backend.transport._send = recording_send
    states = row.run_batch([{"i": i} for i in range(40)], backend=backend, num_threads=20)
    assert [s.error() for s in states] == [None] * 40
    assert all(s["v"] in (" yes", " no") and s["x"] for s in states)
    posted = stub.posted("/generate")
    lists = [body for body in posted if isinstance(body["text"], list) and len(body["text"]) > 2]
    assert lists, "no coalesced list request"
    assert len(posted) < 40 * 3  # three requests per program when sent one by one
    for body in lists:
        for text, params in zip(body["text"], body["sampling_params"]):
            if params.get("max_new_tokens"):  # a gen item (select items score, max 0)
                assert params["max_new_tokens"] == 1 + int(text.split()[1][:-1]) % 3
    assert threading.get_ident() not in senders  # the hub thread never waits on a socket


def test_a_slow_server_gets_every_request_alone(stub, backend):
    """Coalescing never makes an item wait for a slower one: once round trips are long (a
    model generating for real), requests go one by one."""
    import sglrun as sgl

    @sgl.function
    def two(s, i):
        s += f"row {i}:" + sgl.gen("x", max_tokens=2) + sgl.gen("y", max_tokens=2)

    stub.fail("/generate", times=10**6, delay=0.05)  # every answer takes 50 ms
    states = two.run_batch([{"i": i} for i in range(40)], backend=backend, num_threads=20)
    assert [s.error() for s in states] == [None] * 40
    posted = stub.posted("/generate")
    lists = [body for body in posted if isinstance(body["text"], list)]
    assert len(lists) <= 2  # only before the first round trip was measured
    assert len(posted) >= 80 - 2 * 20
    assert backend.coalescer is not None and backend.coalescer.slow


def test_the_coalesce_setting_reaches_the_cli_backend(stub):
    from sglrun.cli.config import Settings
    from sglrun.cli.loader import build_backend

    assert build_backend(Settings(url=[stub.url]), "sglang").coalescer is not None
    assert build_backend(Settings(url=[stub.url], coalesce=False), "sglang").coalescer is None
