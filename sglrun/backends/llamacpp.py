"""The default backend: a GGUF model running in-process on llama.cpp's own server engine.

``LlamaCpp`` loads the model with ``xllamacpp`` (llama.cpp's HTTP server compiled as a Python
extension) and calls its completion handler directly: a dict in, a dict (or a stream of dicts)
out. The engine batches the requests of all threads into its ``n_parallel`` slots, releases
the GIL while it works, and reuses the KV cache of a shared prompt prefix (``cache_prompt``).

How each sampling parameter is honoured:

* sampling (temperature, top_p, top_k, min_p, penalties, ignore_eos, max_new_tokens): sent to
  the engine with SGLang's values, overriding llama.cpp's different defaults.
* regex / dtype / json_schema: an LLGuidance grammar (``grammar.py``) enforced token by token
  (GBNF, and llama.cpp's own schema converter, if the engine lacks LLGuidance). llama.cpp
  quietly ignores an LLGuidance grammar it cannot compile, so each new grammar is first
  proven with a two-token probe; a rejected one raises instead of generating unconstrained.
* stop, stop_regex, stop_token_ids: checked here on the streamed text (``StopWatcher``); the
  first match cuts the text and cancels the generation, and ``finish_reason`` names it.
* min_new_tokens: the first ``min_new_tokens`` tokens are generated with end-of-generation and
  stop tokens banned, then generation continues from exactly those tokens.
* n > 1: n independent samples run concurrently.
* logprobs: the engine's per-token logprobs; prompt logprobs (``logprob_start_len >= 0``) are
  measured by forcing the prompt's own tokens with a token grammar.

``select`` scores each choice the same way: its tokens (as the prompt + choice tokenize) are
forced after the prompt at temperature 0, which returns the model's own log-probability of
each token; all choices run in parallel.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglrun.backends.common import parse_json_schema
from sglrun.backends.grammar import (
    LLGUIDANCE_PREFIX,
    PROBE_MARK,
    json_schema_grammar,
    llguidance_probe,
    regex_grammar,
    strict_json_schema,
)
from sglrun.backends.llamacpp_support import (
    CTX_PER_SLOT,
    DEFAULT_SLOTS,
    GREEDY,
    EngineGate,
    ForcedScoring,
    StopWatcher,
    check_int,
    check_number,
    default_threads,
    limit_openmp_spin,
    logprob_entry,
    signals_held,
    top_entries,
)
from sglrun.backends.model_path import resolve_model_path
from sglrun.errors import (
    BackendError,
    InvalidArgumentError,
    ServerError,
    UnsupportedCapabilityError,
)
from sglrun.lang.backend import (
    Backend,
    ChunkCallback,
    GenerateRequest,
    GenerateResult,
    ImageData,
    SelectRequest,
)
from sglrun.lang.choices import ChoicesDecision, decide
from sglrun.lang.global_config import global_config
from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.chat_template import ChatTemplate
    from sglrun.lang.registry import BackendOptions

__all__ = ["CTX_PER_SLOT", "DEFAULT_SLOTS", "LlamaCpp", "close_live_engines", "default_threads"]

logger = logging.getLogger(__name__)

_DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "bool": REGEX_BOOL, "str": REGEX_STR}


@dataclasses.dataclass
class _Plan:
    """A request's sampling parameters, validated and turned into engine terms."""

    body: dict[str, Any]
    max_new: int
    min_new: int
    n: int
    ignore_eos: bool
    constrained: bool
    stop: tuple[str, ...]
    stop_regex: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    return_logprob: bool
    top_n: int
    with_text: bool
    logprob_start_len: int


@dataclasses.dataclass
class _Segment:
    """What one engine call streamed back."""

    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    id: str = ""


#: How long closing the engine waits for calls that cannot be cancelled (non-streaming ones
#: end within their max_new_tokens); a process exiting with the engine busy waits this long.
CLOSE_TIMEOUT = 30.0


def _close_engine(
    holder: list[Any], gate: EngineGate, pool: ThreadPoolExecutor, slot_dir: str
) -> bool:
    """Free the engine once no thread is inside it; False (engine left alone) if some
    thread still is after ``CLOSE_TIMEOUT``."""
    pool.shutdown(wait=False, cancel_futures=True)
    if holder and not gate.close(CLOSE_TIMEOUT):
        logger.warning("the embedded engine is still busy; it is left to the process exit")
        return False
    holder.clear()  # the last reference: the engine stops its loop and frees the model
    shutil.rmtree(slot_dir, ignore_errors=True)
    return True


_LIVE_ENGINES: weakref.WeakSet[LlamaCpp] = weakref.WeakSet()


@atexit.register
def close_live_engines() -> bool:
    """Stop every engine in order (streaming calls end at their next token, the rest are
    waited for); False if one is still busy. Runs at exit before the interpreter finalizes,
    while threads coming back from the engine can still take the GIL."""
    for engine in list(_LIVE_ENGINES):
        engine.shutdown()
    return not any(engine.busy for engine in list(_LIVE_ENGINES))


class LlamaCpp(Backend):
    """A GGUF model run in-process by llama.cpp (the default backend)."""

    name = "embedded llama.cpp"
    is_chat_model = False

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_parallel: int = DEFAULT_SLOTS,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        chat_template_name: str | None = None,
        verbose: bool = False,
        prompt_cache_mib: int = 1024,
        reproducible: bool = False,
    ) -> None:
        if not isinstance(reproducible, bool):
            raise InvalidArgumentError("reproducible must be a bool")
        # Greedy output depends on what the engine computes together: sequences decoded in
        # one batch, and a prompt prefix reused from the KV cache, take other floating-point
        # paths than one sequence computed alone. Reproducible: one slot, no prompt reuse.
        self.reproducible = reproducible
        if reproducible:
            n_parallel, prompt_cache_mib = 1, 0
        self.n_parallel = check_int("n_parallel", n_parallel, 1)
        self.prompt_cache_mib = check_int("prompt_cache_mib", prompt_cache_mib, 0)
        self.n_ctx = check_int("n_ctx", n_ctx, 256, optional=True) or self.n_parallel * CTX_PER_SLOT
        self.n_threads = check_int("n_threads", n_threads, 1, optional=True) or default_threads()
        if chat_template_name is not None and not isinstance(chat_template_name, str):
            raise InvalidArgumentError("chat_template_name must be a str or None")
        if not isinstance(verbose, bool):
            raise InvalidArgumentError("verbose must be a bool")
        self.chat_template_name = chat_template_name
        self.model_path: Path = resolve_model_path(model_path)
        with open(self.model_path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise BackendError(f"{str(self.model_path)!r} is not a GGUF model file")
        limit_openmp_spin()  # before xllamacpp loads libgomp, which reads it once
        try:
            import xllamacpp as xlc
        except ImportError as exc:  # pragma: no cover - a dependency
            raise BackendError(f"the embedded engine needs xllamacpp: {exc}") from None

        params = xlc.CommonParams()
        params.model.path = str(self.model_path)
        params.n_parallel = self.n_parallel
        params.n_ctx = self.n_ctx
        params.cpuparams.n_threads = self.n_threads
        params.cpuparams_batch.n_threads = self.n_threads
        params.cache_prompt = True
        # Prefix reuse: each slot's own KV cache, plus llama.cpp's host-memory prompt cache
        # shared by all slots (many times faster when rows share a few-shot prefix and land on
        # different slots). No endpoint can empty that cache: flush_cache says so by returning
        # False unless prompt_cache_mib=0.
        params.cache_ram_mib = self.prompt_cache_mib
        if not verbose:
            params.verbosity = -1  # silences llama.cpp
        # The engine also serves HTTP on a loopback port; only this object may use it.
        self._api_key = secrets.token_hex(16)
        params.api_keys = [self._api_key]
        self._slot_dir = tempfile.mkdtemp(prefix="sglrun-llamacpp-")
        params.slot_save_path = self._slot_dir  # enables the slot "erase" action (flush_cache)
        # Signals wait while the engine starts (its threads inherit the mask, so they never
        # take one): a Ctrl-C inside the native constructor left it waiting forever. The
        # engine is registered for shutdown before a held signal can be raised here.
        with signals_held():
            try:
                server = xlc.Server(params)
            except Exception as exc:
                shutil.rmtree(self._slot_dir, ignore_errors=True)
                raise BackendError(
                    f"llama.cpp could not load {str(self.model_path)!r}: {exc}"
                ) from None
            self._holder: list[Any] = [server]
            self._gate = EngineGate()
            self._pool = ThreadPoolExecutor(self.n_parallel, thread_name_prefix="sglrun-llamacpp")
            self._finalizer = weakref.finalize(
                self, _close_engine, self._holder, self._gate, self._pool, self._slot_dir
            )
            self._finalizer.atexit = False  # close_live_engines does it earlier, in order
            _LIVE_ENGINES.add(self)
        self._address = str(server.listening_address).rstrip("/")
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()
        # Built with LLGuidance? Then llama.cpp turns JSON schemas into LLGuidance grammars.
        try:
            self._llguidance = xlc.json_schema_to_grammar({}).startswith(LLGUIDANCE_PREFIX)
        except Exception:  # pragma: no cover - older bindings
            self._llguidance = False
        self._compiled: dict[str, bool] = {}
        self._pieces: dict[int, str] = {}
        self.scoring = ForcedScoring(
            completions=self._call,
            complete=self._complete,
            tokenize=self.tokenize,
            piece=self._piece,
        )
        logger.info(
            "embedded engine: %s, %d threads, %d slots, context %d tokens (%d per slot)",
            self.model_path, self.n_threads, self.n_parallel, self.n_ctx,
            self.n_ctx // self.n_parallel,
        )  # fmt: skip
        props = self._http_json("GET", "/props")
        self._vision = bool((props.get("modalities") or {}).get("vision"))
        self._n_ctx_slot = int((props.get("default_generation_settings") or {}).get("n_ctx", 0))
        eos = props.get("eos_token") or ""
        eos_ids = self.tokenize(eos, add_special=False) if eos else []
        self._eos_id: int | None = eos_ids[0] if len(eos_ids) == 1 else None

    # --- engine plumbing -----------------------------------------------------------------

    def _engine(self) -> Any:
        holder = self._holder
        if not holder or self._gate.closing:
            raise BackendError("the embedded llama.cpp engine was shut down")
        return holder[0]

    def _call(self, body: dict[str, Any], on_event: Callable[[Any], bool] | None = None) -> Any:
        """The engine's completion handler, counted by the gate; a streaming call stops at
        its next token once the engine is closing."""
        gate = self._gate
        if self.reproducible:
            body = dict(body, cache_prompt=False)
        with gate.entered():
            engine = self._engine()
            if on_event is None:
                return engine.handle_completions(body)

            def until_closing(event: Any) -> bool:
                return gate.closing or on_event(event)

            return engine.handle_completions(body, until_closing)

    def _http_json(self, method: str, path: str, body: Any = None) -> Any:
        self._engine()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._address + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": "application/json",
            },
        )
        try:
            with self._http.open(request, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(exc.code, exc.read().decode(errors="replace"), self.name) from None
        except OSError as exc:
            raise BackendError(f"the embedded llama.cpp engine did not answer: {exc}") from None

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` as a prompt (special tokens like ``<|im_start|>`` parsed)."""
        found = self._http_json(
            "POST",
            "/tokenize",
            {"content": text, "add_special": add_special, "parse_special": True},
        )
        return [int(t) for t in found.get("tokens", [])]

    def _fail(self, answer: Any) -> BackendError:
        error = answer.get("error", answer) if isinstance(answer, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        return ServerError(
            int(error.get("code", 500)), str(error.get("message", answer)), self.name
        )

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._call(body)
        if "choices" not in answer:
            raise self._fail(answer)
        return answer

    def _run(
        self,
        body: dict[str, Any],
        watcher: StopWatcher,
        on_chunk: ChunkCallback | None,
        chunk_meta: Callable[[list[dict[str, Any]], int], dict[str, Any]] | None = None,
    ) -> _Segment:
        """Run one completion, feeding ``watcher``. It streams when a caller or a stop condition
        needs to see the text as it grows, and is cancelled as soon as a stop is found. Each
        streamed piece carries ``chunk_meta`` of the token records new since the last one."""
        segment = _Segment()
        failures: list[Any] = []
        unsent: list[dict[str, Any]] = []
        unsent_tokens = [0]

        def on_event(event: dict[str, Any]) -> bool:
            try:
                if "choices" not in event:
                    failures.append(event)
                    return True
                segment.id = event.get("id", segment.id)
                timings = event.get("timings")
                if timings:
                    segment.completion_tokens = int(timings.get("predicted_n", 0))
                    segment.cached_tokens = int(timings.get("cache_n", 0))
                    segment.prompt_tokens = segment.cached_tokens + int(timings.get("prompt_n", 0))
                usage = event.get("usage")
                if usage:
                    segment.completion_tokens = int(usage.get("completion_tokens", 0))
                    segment.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    details = usage.get("prompt_tokens_details") or {}
                    segment.cached_tokens = int(details.get("cached_tokens", 0))
                if not event["choices"]:
                    return False
                choice = event["choices"][0]
                records = (choice.get("logprobs") or {}).get("content") or []
                segment.records.extend(records)
                if choice.get("finish_reason"):
                    segment.finish = choice["finish_reason"]
                tokens = [(int(r.get("id", -1)), bytes(r.get("bytes") or [])) for r in records]
                stopped = watcher.feed(choice.get("text") or "", tokens)
                unsent.extend(records)
                unsent_tokens[0] += len(records) or 1  # one token per event without records
                if on_chunk is not None:
                    piece = watcher.take_safe()
                    if piece:
                        on_chunk(
                            piece, chunk_meta(unsent, unsent_tokens[0]) if chunk_meta else None
                        )
                        unsent.clear()
                        unsent_tokens[0] = 0
                return stopped
            except BaseException as exc:  # the engine swallows callback errors: keep them
                failures.append(exc)
                return True

        if on_chunk is None and not watcher.active:  # one answer: no per-token callbacks
            on_event(self._call(dict(body, stream=False)))
        else:
            self._call(dict(body, stream=True), on_event)
            if self._gate.closing and not failures and segment.finish is None:
                raise BackendError("the embedded llama.cpp engine was shut down")
        if failures:
            if isinstance(failures[0], BaseException):
                raise failures[0]
            raise self._fail(failures[0])
        return segment

    # --- Backend interface ---------------------------------------------------------------

    def get_chat_template(self) -> ChatTemplate:
        from sglrun.lang.chat_template import get_chat_template, get_chat_template_by_model_path

        if self.chat_template_name:
            return get_chat_template(self.chat_template_name)
        return get_chat_template_by_model_path(str(self.model_path))

    def cache_identity(self) -> dict[str, Any]:
        """The model file by its content (hashed once per file and change, see the cache)."""
        return {"backend": "llamacpp", "model": self.model_path}

    def get_model_name(self) -> str:
        return self.model_path.name.removesuffix(".gguf")

    def _checked(self, grammar: str, what: str) -> str:
        """``grammar``, once the engine showed it compiles it: llama.cpp quietly generates
        unconstrained text from an LLGuidance grammar it rejects. Cached per grammar."""
        if not grammar.startswith(LLGUIDANCE_PREFIX):
            return grammar  # GBNF errors are reported by the engine itself
        with self._lock:
            compiled = self._compiled.get(grammar)
        if compiled is None:
            probe = dict(GREEDY, prompt="Hello", max_tokens=2, grammar=llguidance_probe(grammar))
            text = self._complete(probe)["choices"][0]["text"]
            compiled = bool(text) and PROBE_MARK.startswith(text[: len(PROBE_MARK)])
            with self._lock:
                if len(self._compiled) >= 512:
                    self._compiled.clear()
                self._compiled[grammar] = compiled
        if not compiled:
            raise UnsupportedCapabilityError(
                what, self.name, "LLGuidance could not compile it (invalid or unsupported)"
            )
        return grammar

    def _plan(self, params: SamplingParams) -> _Plan:
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError("request.params must be SamplingParams")
        p = params
        max_new = check_int(
            "max_new_tokens", 128 if p.max_new_tokens is None else p.max_new_tokens, 0
        )
        min_new = check_int("min_new_tokens", p.min_new_tokens or 0, 0)
        n = check_int("n", 1 if p.n is None else p.n, 1)
        top_k = check_int("top_k", -1 if p.top_k is None else p.top_k, -1)
        body: dict[str, Any] = {
            "temperature": max(0.0, check_number("temperature", p.temperature, 1.0)),
            "top_p": check_number("top_p", p.top_p, 1.0),
            "top_k": top_k if top_k and top_k > 0 else 0,  # SGLang -1 = llama.cpp 0 = off
            "min_p": check_number("min_p", p.min_p, 0.0),
            "frequency_penalty": check_number("frequency_penalty", p.frequency_penalty, 0.0),
            "presence_penalty": check_number("presence_penalty", p.presence_penalty, 0.0),
            "repeat_penalty": 1.0,
            "ignore_eos": bool(p.ignore_eos),
            "cache_prompt": True,
            "timings_per_token": True,
        }
        for name in ("stop", "stop_regex"):
            values = getattr(p, name) or ()
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise InvalidArgumentError(f"{name} must be a sequence of str")
        StopWatcher(stop_regex=p.stop_regex or ())  # a bad stop_regex fails here, at the call
        stop_ids = tuple(p.stop_token_ids or ())
        for token in stop_ids:
            check_int("stop_token_ids item", token, 0)
        regex = p.regex
        if regex is None and p.dtype is not None:
            if p.dtype not in _DTYPE_REGEX:
                raise InvalidArgumentError(
                    f"dtype must be int, float, bool or str, not {p.dtype!r}"
                )
            regex = _DTYPE_REGEX[p.dtype]
        if regex is not None:
            grammar = regex_grammar(regex, llguidance=self._llguidance)
            body["grammar"] = self._checked(grammar, f"regex {regex!r}")
        elif p.json_schema is not None:
            schema = parse_json_schema(p.json_schema)
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgumentError("json_schema must be a JSON object")
            if global_config.strict_json_schema:
                schema = strict_json_schema(schema)
            if self._llguidance:
                grammar = json_schema_grammar(schema, compact=global_config.compact_json)
                body["grammar"] = self._checked(grammar, "this json_schema")
            else:
                body["json_schema"] = schema  # converted to GBNF by llama.cpp
        start = -1 if p.logprob_start_len is None else int(p.logprob_start_len)
        return _Plan(
            body=body,
            max_new=max_new,
            min_new=min_new,
            n=n,
            ignore_eos=bool(p.ignore_eos),
            constrained="grammar" in body or "json_schema" in body,
            stop=tuple(p.stop or ()),
            stop_regex=tuple(p.stop_regex or ()),
            stop_token_ids=stop_ids,
            return_logprob=bool(p.return_logprob),
            top_n=check_int("top_logprobs_num", p.top_logprobs_num or 0, 0),
            with_text=bool(p.return_text_in_logprobs),
            logprob_start_len=start,
        )

    def _check_images(self, images: list[ImageData]) -> None:
        if images:
            hint = (
                "this model cannot take images"
                if not self._vision
                else "images are not wired into the embedded engine; use a server backend"
            )
            raise UnsupportedCapabilityError("images", self.name, hint)

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        """Generate from ``request.prompt`` (sent raw; special tokens in it are parsed).
        With ``n > 1`` the text is a list, ``finish_reason`` and the output logprobs are
        per-sample lists, ``completion_tokens`` is their total, and nothing streams.
        With a regex, json_schema or dtype the grammar decides where the text ends, so
        ``min_new_tokens`` does not apply there."""
        if not isinstance(request, GenerateRequest):
            raise InvalidArgumentError("generate takes a GenerateRequest")
        self._engine()
        self._check_images(request.images)
        plan = self._plan(request.params)
        prompt = request.prompt
        started = time.perf_counter()
        inputs: Future | None = None
        if plan.return_logprob and plan.logprob_start_len >= 0:
            inputs = self._pool.submit(
                self.scoring.input_logprobs,
                prompt,
                plan.logprob_start_len,
                plan.top_n,
                plan.with_text,
            )
        if plan.n == 1:
            text, meta = self._sample(prompt, plan, on_chunk)
        else:
            jobs = [self._pool.submit(self._sample, prompt, plan, None) for _ in range(plan.n)]
            samples = [job.result() for job in jobs]
            text = [sample_text for sample_text, _ in samples]
            metas = [sample_meta for _, sample_meta in samples]
            meta = dict(metas[0])
            meta["completion_tokens"] = sum(m["completion_tokens"] for m in metas)
            for key in ("finish_reason", "output_token_logprobs", "output_top_logprobs"):
                if key in meta:
                    meta[key] = [m[key] for m in metas]
        if inputs is not None:
            meta["input_token_logprobs"], meta["input_top_logprobs"] = inputs.result()
        meta["e2e_latency"] = time.perf_counter() - started
        return GenerateResult(text, meta)

    def _sample(
        self, prompt: str, plan: _Plan, on_chunk: ChunkCallback | None
    ) -> tuple[str, dict[str, Any]]:
        """One sample: text and meta info."""
        stop_ids = () if plan.ignore_eos else plan.stop_token_ids
        # Plain stop strings with nothing streamed: llama.cpp stops on them itself, with no
        # per-token callback into Python (the engine then runs as fast as a bare loop).
        native = (
            on_chunk is None and not plan.stop_regex and not stop_ids and plan.min_new == 0
            and isinstance(self._native_match(plan.stop), str)
        )  # fmt: skip
        watcher = (
            StopWatcher((), (), ()) if native else StopWatcher(plan.stop, plan.stop_regex, stop_ids)
        )
        want_ids = plan.return_logprob or watcher.needs_token_ids
        base = dict(plan.body, prompt=prompt)
        if native:
            base["stop"] = list(plan.stop)
        if want_ids:
            base["logprobs"] = max(1, plan.top_n)
        made = [0]

        def chunk_meta(records: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
            """A streamed piece's meta: tokens so far, and its own tokens' logprobs."""
            made[0] += tokens
            meta: dict[str, Any] = {"completion_tokens": made[0]}
            if plan.return_logprob:
                meta["output_token_logprobs_length"] = made[0]
                meta["output_token_logprobs"] = [
                    logprob_entry(r, plan.with_text, self._piece) for r in records
                ]
                meta["output_top_logprobs"] = [
                    top_entries(r, plan.top_n, plan.with_text, self._piece) for r in records
                ]
            return meta

        segments: list[_Segment] = []
        if plan.max_new == 0:
            segments.append(_Segment(prompt_tokens=len(self.tokenize(prompt)), finish="length"))
        elif plan.min_new > 0 and not plan.ignore_eos and not plan.constrained:
            # Phase 1: the first tokens may not end the text (EOS and stop tokens banned) ...
            first = min(plan.min_new, plan.max_new)
            banned = dict(base, max_tokens=first, ignore_eos=True, logprobs=base.get("logprobs", 1))
            if plan.stop_token_ids:
                banned["logit_bias"] = [[token, False] for token in plan.stop_token_ids]
            segments.append(self._run(banned, watcher, on_chunk, chunk_meta))
            first_ids = [int(r["id"]) for r in segments[0].records]
            if not watcher.stopped and len(first_ids) == first < plan.max_new:
                # ... phase 2 continues from exactly those tokens (their KV cache is reused).
                rest = dict(base, prompt=[prompt, *first_ids], max_tokens=plan.max_new - first)
                segments.append(self._run(rest, watcher, on_chunk, chunk_meta))
        else:
            body = dict(base, max_tokens=plan.max_new)
            segments.append(self._run(body, watcher, on_chunk, chunk_meta))
        if on_chunk is not None:
            tail = watcher.take_safe(final=True)
            if tail:
                on_chunk(tail)
        records = [r for s in segments for r in s.records]
        completion = sum(s.completion_tokens for s in segments)
        if watcher.stopped:
            finish: dict[str, Any] = {"type": "stop", "matched": watcher.matched}
        elif segments[-1].finish == "stop" and native:
            finish = {"type": "stop", "matched": self._native_match(plan.stop)}
        elif segments[-1].finish == "stop":
            last = int(records[-1]["id"]) if records and want_ids else self._eos_id
            finish = {"type": "stop", "matched": last}
        else:
            finish = {"type": "length", "length": completion}
        meta: dict[str, Any] = {
            "id": segments[0].id,
            "prompt_tokens": segments[0].prompt_tokens,
            "completion_tokens": completion,
            "cached_tokens": segments[0].cached_tokens,
            "finish_reason": finish,
        }
        if plan.return_logprob:
            meta["output_token_logprobs"] = [
                logprob_entry(r, plan.with_text, self._piece) for r in records
            ]
            meta["output_token_logprobs_length"] = len(records)
            meta["output_top_logprobs"] = [
                top_entries(r, plan.top_n, plan.with_text, self._piece) for r in records
            ]
            if plan.max_new == 0 and plan.top_n > 0:  # as SGLang: the next token's top-k
                probe = dict(GREEDY, prompt=prompt, max_tokens=1, logprobs=plan.top_n)
                following = self._run(probe, StopWatcher((), (), ()), None).records
                meta["output_top_logprobs"] = [
                    top_entries(r, plan.top_n, plan.with_text, self._piece) for r in following[:1]
                ]
        return watcher.final_text(), meta

    def _native_match(self, stops: tuple[str, ...]) -> str | int | None:
        """What ended a natively stopped generation: llama.cpp does not say, so the native
        path is used only when one stop string (the end-of-text token aside) could have."""
        end_text = self._piece(self._eos_id) if self._eos_id is not None else None
        words = [stop for stop in stops if stop != end_text]
        if not words:
            return self._eos_id
        return words[0] if len(words) == 1 else None

    def _piece(self, token: int) -> str:
        """The text of one token, special tokens included (cached)."""
        text = self._pieces.get(token)
        if text is None:
            found = self._http_json("POST", "/detokenize", {"tokens": [token]})
            text = self._pieces[token] = str(found.get("content", ""))
        return text

    def select(self, request: SelectRequest) -> ChoicesDecision:
        if not isinstance(request, SelectRequest):
            raise InvalidArgumentError("select takes a SelectRequest")
        choices = request.choices
        if not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidArgumentError("select needs a non-empty list of str choices")
        self._engine()
        self._check_images(request.images)
        prompt_ids = self.tokenize(request.prompt)
        conditional = self._map(
            lambda choice: self.scoring.score_choice(request.prompt, prompt_ids, choice), choices
        )
        unconditional = None
        if request.choices_method.requires_unconditional_logprobs:
            unconditional = self._map(self.scoring.score_alone, conditional)
        return decide(request.choices_method, list(choices), conditional, unconditional)

    def _map(self, func: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        jobs = [self._pool.submit(func, item) for item in items]
        return [job.result() for job in jobs]

    def cache_prefix(self, prefix: str) -> None:
        if prefix:
            self._complete(dict(GREEDY, prompt=prefix, max_tokens=1, cache_prompt=True))

    def flush_cache(self, empty_cache: bool = True) -> bool:
        """Erase every slot's KV cache; False if a slot was busy, the engine is closed, or the
        host-memory prompt cache (``prompt_cache_mib`` > 0), which cannot be emptied, is on."""
        if not self._holder:
            return False
        erased = self.prompt_cache_mib == 0
        for slot in range(self.n_parallel):
            try:
                self._http_json("POST", f"/slots/{slot}?action=erase", {})
            except BackendError:
                erased = False
        return erased

    @property
    def model_info(self) -> dict[str, Any]:
        path = str(self.model_path)
        return {"model_path": path, "tokenizer_path": path, "is_generation": True}

    def get_server_info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.get_model_name(),
            "model_path": str(self.model_path),
            "tokenizer_path": str(self.model_path),  # the GGUF file carries it
            "is_generation": True,
            "n_parallel": self.n_parallel,
            "n_ctx": self.n_ctx,
            "n_ctx_per_slot": self._n_ctx_slot,
            "n_threads": self.n_threads,
            "reproducible": self.reproducible,
            "running": bool(self._holder),
        }

    def supports(self, capability: str) -> bool:
        """Everything the language has, images only for a model that can see."""
        return capability != "images" or bool(getattr(self, "_vision", False))

    def capability_hint(self, capability: str) -> str:
        return "this model cannot take images" if capability == "images" else ""

    @classmethod
    def from_options(cls, options: BackendOptions) -> LlamaCpp:
        """``--backend local``: the GGUF of ``--model`` (else the default model)."""
        return cls(
            model_path=options.model,
            n_parallel=options.slots or DEFAULT_SLOTS,
            n_ctx=options.ctx_size,
            n_threads=options.engine_threads,
            reproducible=options.reproducible,
        )

    def concurrency_hint(self) -> int:
        """Two programs per slot: while one waits between its calls, the other's request is
        already queued for the slot (measured in ``make bench``, part 8)."""
        return 2 * self.n_parallel

    def shutdown(self) -> None:
        """Stop the engine and free the model; safe to call more than once. Calls in flight
        are stopped (streaming ones at their next token) or waited for, never cut off."""
        self._finalizer()

    @property
    def busy(self) -> bool:
        """True while some thread is inside the engine (after ``shutdown``: it was left)."""
        return self._gate.inside > 0

    def __repr__(self) -> str:
        return f"LlamaCpp({str(self.model_path)!r}, n_parallel={self.n_parallel})"
