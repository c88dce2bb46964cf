"""``OpenAI``: any server speaking the OpenAI HTTP API (OpenAI itself, llama.cpp, vLLM, ...).

Chat mode posts ``request.messages`` (plus the open assistant turn) to /v1/chat/completions;
completion mode posts ``request.prompt`` to /v1/completions. What a server takes beyond the
OpenAI API (grammars, prefills, guided choices) is its dialect (``openai_dialects.py``),
chosen by ``constraint_dialect`` or detected from GET /v1/models or /props ("auto").
``select`` on completion models scores each choice's log-probability and applies
``choices_method``: llama.cpp forces the choice's exact tokens with a token grammar
(``<[id]>``) and reports their log-probabilities; other servers echo the prompt with
logprobs. ``select_strategy="constrained"`` instead decodes once under the dialect's choice
constraint.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from sglrun.backends.common import (
    TokenUsage,
    apply_dtype,
    batch_options,
    match_choice,
    parse_json_schema,
)
from sglrun.backends.http import DEFAULT_RETRIES, DEFAULT_TIMEOUT, HTTPTransport
from sglrun.backends.openai_dialects import (
    DIALECTS,
    Dialect,
    PrefillStripper,
    openai_logprobs,
    strip_prefill,
    token_gbnf,
)
from sglrun.errors import (
    InvalidArgumentError,
    ServerError,
    TransportError,
    UnsupportedCapabilityError,
)
from sglrun.lang.backend import (
    Backend,
    ChunkCallback,
    GenerateRequest,
    GenerateResult,
    SelectRequest,
)
from sglrun.lang.choices import ChoicesDecision, decide
from sglrun.lang.hub import map_concurrently, run_blocking
from sglrun.lang.ir import SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.registry import BackendOptions

__all__ = ["OpenAI", "TokenUsage", "guess_is_chat_model"]  # TokenUsage: from common

logger = logging.getLogger(__name__)

SELECT_STRATEGIES = ("auto", "constrained", "logprobs", "generate")
OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_CONCURRENCY = 32


def guess_is_chat_model(model_name: str) -> bool:
    """Chat unless the name says otherwise ("...-instruct", the legacy completion models)."""
    name = model_name.lower().rsplit("/", 1)[-1]
    if "instruct" in name or name.startswith(("davinci", "babbage", "text-", "code-")):
        return False
    return True


def _split_url(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgumentError(f"base_url must be an http(s) URL, not {url!r}")
    return f"{parts.scheme}://{parts.netloc}", parts.path or "/v1"


class OpenAI(Backend):
    """An OpenAI-compatible server. ``base_url`` defaults to ``$OPENAI_BASE_URL`` or OpenAI's;
    a URL without a path gets ``/v1``. A list of URLs spreads requests over equal servers."""

    name = "OpenAI"
    cooperative = True  # its HTTP waits park on the hub

    def __init__(
        self,
        model_name: str,
        base_url: str | list[str] | None = None,
        api_key: str | None = None,
        is_chat_model: bool | None = None,
        chat_template: Any = None,
        *,
        extra_body: dict[str, Any] | None = None,
        timeout: Any = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        verify: bool | str | None = None,
        constraint_dialect: str = "auto",
        select_strategy: str = "auto",
        batch: bool = False,
        batch_jobs: str | None = None,
        batch_poll: float | None = None,
    ) -> None:
        if constraint_dialect not in (*DIALECTS, "auto"):
            raise InvalidArgumentError(
                f"constraint_dialect must be one of {(*DIALECTS, 'auto')}, "
                f"not {constraint_dialect!r}"
            )
        if select_strategy not in SELECT_STRATEGIES:
            raise InvalidArgumentError(f"select_strategy must be one of {SELECT_STRATEGIES}")
        self.model_name = model_name
        urls = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
        split = [_split_url(u) for u in ([urls] if isinstance(urls, str) else urls)]
        prefixes = {prefix for _, prefix in split}
        if len(prefixes) != 1:
            raise InvalidArgumentError("all base URLs must have the same path (e.g. /v1)")
        self.api_prefix = prefixes.pop()
        self.is_openai = any(root == "https://api.openai.com" for root, _ in split)
        key = api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("SGLRUN_API_KEY")
        if not key and self.is_openai:
            raise InvalidArgumentError(
                "the OpenAI API needs a key: pass api_key= or set OPENAI_API_KEY"
            )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.transport = HTTPTransport(
            [root for root, _ in split],
            headers=headers,
            timeout=timeout,
            retries=retries,
            verify=verify,
        )
        self.is_chat_model = (
            guess_is_chat_model(model_name) if is_chat_model is None else bool(is_chat_model)
        )
        self._chat_template = chat_template
        self.extra_body = dict(extra_body or {})
        self.token_usage = TokenUsage()
        self.select_strategy = select_strategy
        self._dialect = None if constraint_dialect == "auto" else constraint_dialect
        self._slots: int | None = None  # a llama.cpp server's slots, from /props
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.batch = bool(batch)
        if self.batch:  # the Batch API at half the price: see batch_api
            from sglrun.backends.batch_api import batch_transport
            from sglrun.backends.batch_providers import OpenAIBatchAPI

            paths = [f"{self.api_prefix}/chat/completions", f"{self.api_prefix}/completions"]
            api = OpenAIBatchAPI(self.transport, self.api_prefix)
            self.transport = batch_transport(self.transport, api, paths, batch_jobs, batch_poll)  # type: ignore[assignment]  # same surface

    @classmethod
    def from_options(cls, options: BackendOptions) -> OpenAI:
        """``--backend openai --model NAME``, at ``--url`` (else $OPENAI_BASE_URL or OpenAI)."""
        extra = options.transport_settings()
        urls = list(options.urls)
        base_url = (urls if len(urls) > 1 else urls[0]) if urls else None
        assert options.model is not None  # the registry entry says needs_model
        extra.update(batch_options(options))
        return cls(options.model, base_url=base_url, api_key=options.api_key,
                   verify=options.verify, **extra)  # fmt: skip

    def __repr__(self) -> str:
        mode = "chat" if self.is_chat_model else "completion"
        return f"OpenAI({self.model_name!r}, {self.transport.pool.urls!r}, {mode})"

    # ------------------------------------------------------------------ info
    def cache_identity(self) -> dict[str, Any]:
        """The model, and the server unless it is OpenAI's: a local server's model name (often
        "default") does not say which model it runs. No key, no URL password."""
        from sglrun.backends.http_support import mask_url

        servers = None if self.is_openai else sorted(map(mask_url, self.transport.pool.urls))
        return {"backend": "openai", "model": self.model_name, "servers": servers,
                "chat": self.is_chat_model, "extra_body": self.extra_body}  # fmt: skip

    def get_model_name(self) -> str:
        return self.model_name

    def get_chat_template(self) -> Any:
        from sglrun.lang.chat_template import get_chat_template, get_chat_template_by_model_path

        if self._chat_template is not None:
            if isinstance(self._chat_template, str):
                return get_chat_template(self._chat_template)
            return self._chat_template
        if self.is_chat_model:
            return get_chat_template("chatgpt")
        return get_chat_template_by_model_path(self.model_name)

    def get_server_info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_name,
            **self.model_info,
            "dialect": self.dialect,
            "chat": self.is_chat_model,
            "endpoints": self.transport.pool.urls,
        }

    @property
    def stats(self) -> Any:
        return self.transport.stats

    def shutdown(self) -> None:
        self.transport.close()

    @property
    def dialect(self) -> str:
        """Which constraint parameters the server takes: "llamacpp", "vllm" or "none"."""
        if self._dialect is None:
            # Detected on a worker thread: a lock is never held across a park.
            return run_blocking(self._detect_once)
        return self._dialect

    def _detect_once(self) -> str:
        with self._lock:
            if self._dialect is None:
                found, certain = self._detect_dialect()
                if not certain:  # the server was failing: ask again next time
                    return found
                self._dialect = found
            return self._dialect

    def _detect_dialect(self) -> tuple[str, bool]:
        if self.is_openai:
            return "none", True
        certain = True
        try:
            models = self.transport.request(
                "GET", f"{self.api_prefix}/models", timeout=self.transport.probe_timeout
            )
            for entry in (models or {}).get("data", []) if isinstance(models, dict) else []:
                owner = str(entry.get("owned_by", "")).lower()
                if owner in ("llamacpp", "llama.cpp"):
                    return "llamacpp", True
                if owner == "vllm":
                    return "vllm", True
        except ServerError as exc:
            certain = certain and exc.status < 500 and exc.status != 429
        try:
            props = self.transport.request("GET", "/props", timeout=self.transport.probe_timeout)
            if isinstance(props, dict) and (
                "default_generation_settings" in props or "total_slots" in props
            ):
                slots = props.get("total_slots")
                if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
                    self._slots = slots
                return "llamacpp", True
        except ServerError as exc:
            certain = certain and exc.status < 500 and exc.status != 429
        return "none", certain

    def concurrency_hint(self) -> int:
        """A llama.cpp server: two programs per slot it reports; any other server: 32 (a
        hosted API's rate limit, not its capacity, is what usually binds). In batch mode,
        enough for every row to join one job."""
        if self.batch:
            from sglrun.backends.batch_api import BATCH_IN_FLIGHT

            return BATCH_IN_FLIGHT
        if self.dialect == "llamacpp" and self._slots is None:
            try:
                props = self.transport.request("GET", "/props")
            except Exception:  # advisory: fall back to the default
                props = None
            slots = props.get("total_slots") if isinstance(props, dict) else None
            self._slots = slots if isinstance(slots, int) and slots > 0 else 0
        if self._slots:
            return 2 * self._slots
        return DEFAULT_CONCURRENCY

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s backend: %s", self.name, message)

    # ------------------------------------------------------------- payloads
    @property
    def speaks(self) -> Dialect:
        """The server's dialect, as the object that knows its parameters."""
        return DIALECTS[self.dialect]

    def supports(self, capability: str) -> bool:
        if capability == "json_schema" and self.is_chat_model:
            return True  # response_format, on every server
        if capability == "images":
            return self.is_chat_model
        return self.speaks.supports(capability)

    def capability_hint(self, capability: str) -> str:
        if capability == "images":
            return "completion models take no images; use a chat model"
        return self.speaks.hint(capability)

    def _sampling(self, params: SamplingParams, chat: bool) -> dict[str, Any]:
        speaks = self.speaks
        body: dict[str, Any] = {"model": self.model_name}
        if params.max_new_tokens is not None:
            name = (
                "max_completion_tokens"
                if self.is_openai
                and chat
                and self.model_name.startswith(("o1", "o3", "o4", "gpt-5"))
                else "max_tokens"
            )
            body[name] = params.max_new_tokens
        if params.stop:
            body["stop"] = list(params.stop)
        for key in ("temperature", "top_p"):
            if getattr(params, key) is not None:
                body[key] = getattr(params, key)
        for key in ("frequency_penalty", "presence_penalty"):
            if getattr(params, key):
                body[key] = getattr(params, key)
        if (params.n or 1) != 1:
            body["n"] = params.n
        if params.stop_regex:
            raise speaks.unsupported("stop_regex", "OpenAI-compatible servers take plain stops")
        speaks.sampling(params, body, self._warn_once)
        if params.return_logprob:
            if chat:
                body["logprobs"] = True
                if params.top_logprobs_num:
                    body["top_logprobs"] = params.top_logprobs_num
            else:
                body["logprobs"] = params.top_logprobs_num or 1
        self._constraints(params, chat, body)
        return body

    def _constraints(self, params: SamplingParams, chat: bool, body: dict[str, Any]) -> None:
        if params.regex is not None and params.json_schema is not None:
            raise InvalidArgumentError("regex and json_schema cannot both be set")
        if params.regex is not None:
            body.update(self.speaks.regex(params.regex))
        if params.json_schema is not None:
            schema = parse_json_schema(params.json_schema)
            if chat:
                title = schema.get("title") if isinstance(schema, dict) else None
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": str(title or "output"), "schema": schema},
                }
            else:
                body.update(self.speaks.completion_schema(schema))

    def _messages(
        self, request: GenerateRequest | SelectRequest, body: dict[str, Any]
    ) -> list[dict[str, Any]]:
        messages = [dict(m) for m in request.messages]
        if request.role is None:
            if not messages:
                messages = [{"role": "user", "content": request.prompt}]
        elif request.role != "assistant":
            raise UnsupportedCapabilityError(
                f"gen inside a {request.role} turn",
                self.name,
                "chat models generate only in an assistant turn (use sgl.assistant)",
            )
        elif request.role_text.strip():
            self.speaks.prefill(body)  # the dialect's way to continue it (or a clear refusal)
            messages.append({"role": "assistant", "content": request.role_text})
        seen = {
            part.get("image_url", {}).get("url")
            for m in messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict)
        }
        extra = [img for img in request.images if img.data_url not in seen]
        if extra:
            target = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if target is None:
                target = {"role": "user", "content": ""}
                messages.append(target)
            content = target["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            target["content"] = parts + [
                {"type": "image_url", "image_url": {"url": img.data_url}} for img in extra
            ]
        return messages

    def _post(self, chat: bool, body: dict[str, Any]) -> dict[str, Any]:
        path = f"{self.api_prefix}/{'chat/completions' if chat else 'completions'}"
        answer = self.transport.request("POST", path, {**body, **self.extra_body})
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise TransportError(f"{path} answered without choices")
        usage = answer.get("usage") or {}
        self.token_usage.add(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        return answer

    # -------------------------------------------------------------- generate
    def _request_body(self, request: GenerateRequest) -> tuple[bool, dict[str, Any]]:
        chat = self.is_chat_model
        params = apply_dtype(request.params)
        body = self._sampling(params, chat)
        if chat:
            body["messages"] = self._messages(request, body)
        else:
            if request.images:
                raise UnsupportedCapabilityError(
                    "images", self.name, "completion models take no images; use a chat model"
                )
            body["prompt"] = request.prompt
        return chat, body

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        chat, body = self._request_body(request)
        prefill = request.role_text if chat and request.role_text.strip() else ""
        if on_chunk is not None and (request.params.n or 1) == 1 and not self.batch:
            return self._stream(chat, body, prefill, on_chunk)
        result = self._generated(request, chat, body, prefill)
        if on_chunk is not None and isinstance(result.text, str) and result.text:
            on_chunk(result.text)  # batch mode: the whole answer as one chunk
        return result

    def _generated(
        self, request: GenerateRequest, chat: bool, body: dict[str, Any], prefill: str
    ) -> GenerateResult:
        answer = self._post(chat, body)
        texts, metas = [], []
        for choice in sorted(answer["choices"], key=lambda c: c.get("index", 0)):
            if chat:
                text = (choice.get("message") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            texts.append(strip_prefill(text, prefill))
            metas.append(_finish(choice.get("finish_reason"), body))
        usage = answer.get("usage") or {}
        meta: dict[str, Any] = {
            "id": answer.get("id"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": metas[0] if metas else None,
        }
        if request.params.return_logprob and answer["choices"]:
            meta.update(openai_logprobs(answer["choices"][0].get("logprobs")))
        if (request.params.n or 1) != 1:
            meta["finish_reasons"] = metas
            return GenerateResult(texts, meta)
        return GenerateResult(texts[0] if texts else "", meta)

    def _stream(
        self, chat: bool, body: dict[str, Any], prefill: str, on_chunk: ChunkCallback
    ) -> GenerateResult:
        body = {
            **body,
            **self.extra_body,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        path = f"{self.api_prefix}/{'chat/completions' if chat else 'completions'}"
        stripper = PrefillStripper(prefill)
        text, finish, usage, ident = "", None, {}, None
        for event in self.transport.stream("POST", path, body):
            data = event.data
            if not isinstance(data, dict):
                continue
            ident = data.get("id", ident)
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                if chat:
                    delta = (choice.get("delta") or {}).get("content") or ""
                else:
                    delta = choice.get("text") or ""
                piece = stripper.feed(delta)
                if piece:
                    text += piece
                    on_chunk(piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        rest = stripper.finish()
        if rest:
            text += rest
            on_chunk(rest)
        self.token_usage.add(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        return GenerateResult(
            text,
            {
                "id": ident,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "finish_reason": _finish(finish, body),
            },
        )

    # ---------------------------------------------------------------- select
    def select(self, request: SelectRequest) -> ChoicesDecision:
        choices = list(request.choices)
        if not choices:
            raise InvalidArgumentError("select needs at least one choice")
        strategy = self.select_strategy
        speaks = self.speaks
        chat = self.is_chat_model
        # Scoring each choice's exact tokens honours choices_method; greedy decoding under a
        # choice constraint can be led astray by a likely first character ("L" of London).
        scorable = not chat or speaks.scoring == "tokens"
        if self.batch and strategy in ("auto", "logprobs"):
            strategy = "constrained"  # scoring needs live tokenizer calls
        if strategy == "auto" or (strategy == "logprobs" and not scorable):
            strategy = "logprobs" if scorable else "constrained"
        if strategy == "constrained" and not speaks.choice_constraint:
            strategy = "generate"
        if strategy == "logprobs":
            if speaks.scoring == "tokens":
                cond, uncond = self._score_by_tokens(request, choices)
            else:
                cond, uncond = self._score_by_echo(request, choices)
            decision = decide(request.choices_method, choices, cond, uncond)
            decision.meta_info = {**(decision.meta_info or {}), "strategy": "logprobs"}
            return decision
        width = max(len(c) for c in choices) + 4
        params = SamplingParams.defaults(max_new_tokens=width, temperature=request.temperature)
        body = self._sampling(params, self.is_chat_model)
        if strategy == "constrained":
            body.update(speaks.choices(choices))
        if self.is_chat_model:
            body["messages"] = self._messages(request, body)
        else:
            body["prompt"] = request.prompt
        answer = self._post(self.is_chat_model, body)
        first = answer["choices"][0] if answer["choices"] else {}
        text = (
            (first.get("message") or {}).get("content") if self.is_chat_model else first.get("text")
        ) or ""
        if self.is_chat_model:
            text = strip_prefill(text, request.role_text if request.role_text.strip() else "")
        chosen, how = match_choice(text, choices)
        return ChoicesDecision(chosen, {"strategy": strategy, **how})

    def _tokenize(self, text: str, special: bool) -> list[int]:
        answer = self.transport.request(
            "POST", "/tokenize", {"content": text, "add_special": special}
        )
        return [t["id"] if isinstance(t, dict) else int(t) for t in answer.get("tokens", [])]

    def _force(self, body: dict[str, Any], forced: list[int], chat: bool) -> list[list[Any]]:
        """Generate exactly ``forced`` (a token grammar) and read each token's logprob."""
        if not forced:
            return []
        body = {
            **body,
            "grammar": token_gbnf(forced),
            "max_tokens": len(forced),
            "temperature": 0,
            "logprobs": True if chat else 1,
            "n": 1,
        }
        body.pop("top_logprobs", None)
        answer = self._post(chat, body)
        entries = openai_logprobs((answer["choices"][0] or {}).get("logprobs"))
        got = entries.get("output_token_logprobs", [])[: len(forced)]
        if [e[1] for e in got] != list(forced):
            raise UnsupportedCapabilityError(
                "select",
                self.name,
                "the server did not honour a token grammar; pass select_strategy='constrained'",
            )
        return got

    def _score_by_tokens(
        self, request: SelectRequest, choices: list[str]
    ) -> tuple[list[list[list[Any]]], list[list[list[Any]]] | None]:
        """Each choice's exact tokens scored in parallel requests (the server batches them)."""
        plain = self._sampling(SamplingParams.defaults(max_new_tokens=1), False)
        if self.is_chat_model:
            base = self._sampling(SamplingParams.defaults(max_new_tokens=1), True)
            base["messages"] = self._messages(request, base)

            def conditional(choice: str) -> list[list[Any]]:
                return self._force(base, self._tokenize(choice, False), chat=True)
        else:
            prompt_ids = self._tokenize(request.prompt, True)

            def conditional(choice: str) -> list[list[Any]]:
                full = self._tokenize(request.prompt + choice, True)
                k = 0
                while k < min(len(full), len(prompt_ids)) and full[k] == prompt_ids[k]:
                    k += 1
                lead: list[list[Any]] = []
                if k == 0 and full:  # nothing to condition on: the first token has no logprob
                    lead, k = [[None, full[0], None]], 1
                return lead + self._force({**plain, "prompt": full[:k]}, full[k:], False)

        def unconditional(tokens: list[list[Any]]) -> list[list[Any]]:
            ids = [e[1] for e in tokens]  # the choice's own tokens, from its first one on
            head = [[None, ids[0], tokens[0][2]]] if ids else []
            return head + self._force({**plain, "prompt": ids[:1]}, ids[1:], False)

        cond = map_concurrently(conditional, choices)
        if not getattr(request.choices_method, "requires_unconditional_logprobs", False):
            return cond, None
        return cond, map_concurrently(unconditional, cond)

    def _score_by_echo(
        self, request: SelectRequest, choices: list[str]
    ) -> tuple[list[list[list[Any]]], list[list[list[Any]]] | None]:
        def score(prompts: list[str], skip: int) -> list[list[list[Any]]]:
            body = self._sampling(SamplingParams.defaults(max_new_tokens=1, temperature=0.0), False)
            body.update(prompt=prompts, echo=True, logprobs=1)
            answer = self._post(False, body)
            out = []
            for choice in sorted(answer["choices"], key=lambda c: c.get("index", 0)):
                end = len(prompts[choice.get("index", 0)])
                lp = choice.get("logprobs") or {}
                entries = []
                for token, value, offset in zip(
                    lp.get("tokens", []), lp.get("token_logprobs", []), lp.get("text_offset", [])
                ):
                    if offset + len(token) > skip and offset < end:
                        entries.append([value, None, token])
                out.append(entries)
            return out

        cond = score([request.prompt + c for c in choices], len(request.prompt))
        uncond = None
        if getattr(request.choices_method, "requires_unconditional_logprobs", False):
            uncond = score(list(choices), 0)
        return cond, uncond


# ---------------------------------------------------------------------- helpers
def _finish(reason: str | None, body: dict[str, Any]) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "length":
        return {
            "type": "length",
            "length": body.get("max_tokens", body.get("max_completion_tokens")),
        }
    if reason == "stop":
        return {"type": "stop", "matched": None}
    return {"type": reason}
