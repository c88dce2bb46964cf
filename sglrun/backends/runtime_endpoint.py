"""``RuntimeEndpoint``: an SGLang server over its native HTTP API.

``GET /get_model_info`` on construction, ``POST /generate`` for text (single or streamed, SSE
chunks carrying the cumulative text), and ``select`` the way SGLang's own RuntimeEndpoint does
it: cache the shared prefix, then one list request scoring every ``prompt + choice`` with
``return_logprob``, then (for ``unconditional_likelihood_normalized``) one list request with
only the choices' tokens.
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sglrun.backends.coalesce import Coalescer
from sglrun.backends.common import apply_dtype
from sglrun.backends.http import DEFAULT_RETRIES, DEFAULT_TIMEOUT, HTTPTransport
from sglrun.errors import InvalidArgumentError, ServerError, TransportError
from sglrun.lang.backend import (
    INCREMENTAL_META_KEYS,
    Backend,
    ChunkCallback,
    GenerateRequest,
    GenerateResult,
    ImageData,
    SelectRequest,
)
from sglrun.lang.choices import ChoicesDecision, decide
from sglrun.lang.ir import SAMPLING_FIELDS, SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.registry import BackendOptions

__all__ = ["Runtime", "RuntimeEndpoint"]

MAX_HINT = 1024  # programs in flight, at most, whatever a server advertises
DEFAULT_URL = "http://127.0.0.1:30000"  # where sglang.launch_server listens by default

# Fields sent at the top level of the request.
_TOP_LEVEL_KEYS = (
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
)
# The rest of SamplingParams (dtype aside: it becomes a regex) goes in "sampling_params".
_SAMPLING_KEYS = tuple(f for f in SAMPLING_FIELDS if f not in (*_TOP_LEVEL_KEYS, "dtype"))


def sampling_payload(params: SamplingParams) -> dict[str, Any]:
    """The ``sampling_params`` object of a /generate request."""
    out: dict[str, Any] = {}
    for key, value in zip(_SAMPLING_KEYS, _sampling_values(params)):
        if value is not None:
            out[key] = list(value) if type(value) is tuple else value
    return out


_sampling_values = operator.attrgetter(*_SAMPLING_KEYS)


class RuntimeEndpoint(Backend):
    """An SGLang server (or several equivalent ones: pass a list of URLs)."""

    name = "SGLang runtime"
    support_concate_and_append = False
    cooperative = True  # its HTTP waits park on the hub
    model_info: dict[str, Any] = {}  # type: ignore[assignment]  # the server's, read at start

    def __init__(
        self,
        base_url: str | list[str],
        api_key: str | None = None,
        verify: bool | str | None = None,
        chat_template_name: str | None = None,
        *,
        timeout: Any = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry_time: float | None = None,
        coalesce: bool = True,
        max_batch: int = 256,
        max_in_flight: int = 8,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("SGLRUN_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        extra: dict[str, Any] = {} if retry_time is None else {"retry_time": retry_time}
        self.transport = HTTPTransport(
            base_url, headers=headers, timeout=timeout, retries=retries, verify=verify, **extra
        )
        self.base_url = self.transport.pool.urls[0]
        self.verify = verify
        self.chat_template_name = chat_template_name
        self._chat_template: Any = None
        self._lock = threading.Lock()
        info = self.transport.request(
            "GET", "/get_model_info", timeout=self.transport.probe_timeout
        )
        if not isinstance(info, dict):
            raise TransportError(f"{self.base_url}/get_model_info did not answer a JSON object")
        self.model_info = info
        # Requests that arrive while ``max_in_flight`` others are out go together as one list
        # request: SGLang batches them anyway, and one round trip then serves many programs.
        self.coalescer = (
            Coalescer(
                self._send_items,
                max_batch=max_batch,
                max_in_flight=max_in_flight,
                cooperative=True,
            )
            if coalesce
            else None
        )

    @classmethod
    def from_options(cls, options: BackendOptions) -> RuntimeEndpoint:
        """``--backend sglang``: the servers of ``--url`` (else SGLang's default address)."""
        extra = options.transport_settings()
        urls = list(options.urls) or [DEFAULT_URL]
        return cls(
            urls if len(urls) > 1 else urls[0],
            api_key=options.api_key,
            verify=options.verify,
            coalesce=options.coalesce,
            **extra,
        )

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.transport.pool.urls!r}, model={self.get_model_name()!r})"

    # ------------------------------------------------------------------ info
    def cache_identity(self) -> dict[str, Any]:
        """The served model (``/get_model_info``), whatever address the server has today."""
        return {"backend": "sglang", "model": self.get_model_name()}

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path", "unknown"))

    def get_chat_template(self) -> Any:
        with self._lock:
            if self._chat_template is None:
                from sglrun.lang.chat_template import (
                    get_chat_template,
                    get_chat_template_by_model_path,
                )

                if self.chat_template_name:
                    self._chat_template = get_chat_template(self.chat_template_name)
                else:
                    self._chat_template = get_chat_template_by_model_path(self.get_model_name())
            return self._chat_template

    def get_server_info(self) -> dict[str, Any]:
        try:
            info = self.transport.request("GET", "/server_info")
        except ServerError as exc:
            if exc.status not in (404, 405):
                raise
            info = self.transport.request("GET", "/get_server_info")
        return info if isinstance(info, dict) else {"info": info}

    def concurrency_hint(self) -> int | None:
        """The server's ``max_running_requests`` when its server info says (capped at
        ``MAX_HINT``), else None: the scheduler's default, which is SGLang's own."""
        try:
            info = self.get_server_info()
        except Exception:  # advisory: a server without the endpoint gets the default
            return None
        candidates = [info.get("max_running_requests")]
        states = info.get("internal_states")
        if isinstance(states, list) and states and isinstance(states[0], dict):
            candidates.append(states[0].get("max_running_requests"))
        for value in candidates:
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return min(value, MAX_HINT)
        return None

    def flush_cache(self, empty_cache: bool = True) -> bool:
        self.transport.request("POST", "/flush_cache", {"empty_cache": empty_cache})
        return True

    def cache_prefix(self, prefix: str) -> None:
        self.transport.request(
            "POST", "/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}}
        )

    def concatenate_and_append(self, src_rids: Sequence[str], dst_rid: str) -> None:
        """KV-cache concatenation is not used: the interpreter joins text instead."""

    def shutdown(self) -> None:
        self.transport.close()

    @property
    def stats(self) -> Any:
        return self.transport.stats

    # -------------------------------------------------------------- generate
    @staticmethod
    def _images(images: Sequence[ImageData], count: int | None = None) -> Any:
        data = [image.base64_data for image in images]
        single: Any = data[0] if len(data) == 1 else data
        return single if count is None else [single] * count

    def _generate_body(self, request: GenerateRequest) -> dict[str, Any]:
        params = apply_dtype(request.params)
        body: dict[str, Any] = {"text": request.prompt, "sampling_params": sampling_payload(params)}
        for key in _TOP_LEVEL_KEYS:
            value = getattr(params, key)
            if value is not None:
                body[key] = value
        if request.images:
            body["image_data"] = self._images(request.images)
        return body

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        body = self._generate_body(request)
        n = request.params.n or 1
        if on_chunk is not None and n == 1:
            return self._generate_stream(body, on_chunk)
        if n == 1 and not request.images:
            answer = self._generate_items([body])[0]
        else:
            answer = self.transport.request("POST", "/generate", body)
        if isinstance(answer, list):  # n > 1: one result per sample
            texts = [str(item.get("text", "")) for item in answer]
            metas = [dict(item.get("meta_info") or {}) for item in answer]
            meta = dict(metas[0]) if metas else {}
            meta["completion_tokens"] = sum(int(m.get("completion_tokens") or 0) for m in metas)
            meta["finish_reason"] = [m.get("finish_reason") for m in metas]
            meta["meta_info_list"] = metas
            return GenerateResult(texts, meta)
        if not isinstance(answer, dict) or "text" not in answer:
            raise TransportError(f"{self.base_url}/generate answered without a text")
        return GenerateResult(str(answer["text"]), dict(answer.get("meta_info") or {}))

    def _generate_stream(self, body: dict[str, Any], on_chunk: ChunkCallback) -> GenerateResult:
        body = {**body, "stream": True}
        text = ""
        meta: dict[str, Any] = {}
        so_far: dict[str, list[Any]] = {key: [] for key in INCREMENTAL_META_KEYS}
        unsent: dict[str, list[Any]] = {key: [] for key in INCREMENTAL_META_KEYS}
        for event in self.transport.stream("POST", "/generate", body):
            data = event.data
            if not isinstance(data, dict):
                continue
            current = str(data.get("text", ""))
            # SGLang streams the cumulative text; tolerate servers that send increments
            # (--incremental-streaming-output), for the logprob lists too.
            delta = current[len(text) :] if current.startswith(text) else current
            text = current if current.startswith(text) else text + current
            meta = dict(data.get("meta_info") or meta)
            piece_meta = dict(meta)
            for key in INCREMENTAL_META_KEYS:
                entries = meta.get(key)
                if not isinstance(entries, list):
                    continue
                seen = so_far[key]
                cumulative = len(entries) >= len(seen) and entries[: len(seen)] == seen
                new = entries[len(seen) :] if cumulative else entries
                unsent[key].extend(new)  # an event without text passes its entries on
                piece_meta[key] = unsent[key]
                seen.extend(new)
                meta[key] = list(seen)
            if delta:
                on_chunk(delta, piece_meta)
                unsent = {key: [] for key in INCREMENTAL_META_KEYS}
        return GenerateResult(text, meta)

    # ---------------------------------------------------------------- batching
    def _generate_items(self, items: list[dict[str, Any]]) -> list[Any]:
        """One /generate result per single-form item, coalesced with other callers' items."""
        if self.coalescer is not None:
            return self.coalescer.call(items)
        return self._send_items(items)

    def _send_items(self, items: list[dict[str, Any]]) -> list[Any]:
        if len(items) == 1:
            return [self.transport.request("POST", "/generate", items[0])]
        answers = self.transport.request("POST", "/generate", _list_body(items))
        if not isinstance(answers, list) or len(answers) != len(items):
            raise TransportError(f"{self.base_url}/generate did not answer one result per text")
        return answers

    # ---------------------------------------------------------------- select
    def select(self, request: SelectRequest) -> ChoicesDecision:
        choices = list(request.choices)
        if not choices:
            raise InvalidArgumentError("select needs at least one choice")
        prefix_body: dict[str, Any] = {
            "text": request.prompt,
            "sampling_params": {"max_new_tokens": 0},
        }
        if request.images:
            prefix_body["image_data"] = self._images(request.images)
        if request.images:
            prefix = self.transport.request("POST", "/generate", prefix_body)
        else:
            prefix = self._generate_items([prefix_body])[0]
        prompt_len = int(_meta(prefix, self.base_url).get("prompt_tokens") or 0)
        # Start a couple of tokens early: the prompt's last token may merge with the choice
        # (token healing), and its log-probability is then part of the choice's.
        start = max(prompt_len - 2, 0)
        body: dict[str, Any] = {
            "text": [request.prompt + choice for choice in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": start,
        }
        if request.images:
            body["image_data"] = self._images(request.images, len(choices))
            answers = self.transport.request("POST", "/generate", body)
        else:
            answers = self._generate_items(_split_items(body))
        if not isinstance(answers, list) or len(answers) != len(choices):
            raise TransportError(f"{self.base_url}/generate did not answer one result per choice")
        metas = [_meta(a, self.base_url) for a in answers]
        input_logprobs = [
            _choice_tokens(m, request.prompt, choice, prompt_len)
            for m, choice in zip(metas, choices)
        ]
        output_logprobs = [list(m.get("output_token_logprobs") or []) for m in metas]
        unconditional = None
        if choices_method_needs_unconditional(request):
            ids = [[entry[1] for entry in tokens] for tokens in input_logprobs]
            uncond = self.transport.request(
                "POST",
                "/generate",
                {
                    "input_ids": ids,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                    "return_logprob": True,
                    "return_text_in_logprobs": True,
                    "logprob_start_len": 0,
                },
            )
            if not isinstance(uncond, list) or len(uncond) != len(choices):
                raise TransportError(f"{self.base_url}/generate did not answer per choice")
            unconditional = [
                [_triple(e) for e in (_meta(u, self.base_url).get("input_token_logprobs") or [])]
                for u in uncond
            ]
        decision = decide(
            request.choices_method, choices, input_logprobs, unconditional, output_logprobs
        )
        info = dict(decision.meta_info or {})
        info["server_normalized_prompt_logprob"] = [
            m.get("normalized_prompt_logprob") for m in metas
        ]
        decision.meta_info = info
        return decision


def _list_body(items: list[dict[str, Any]]) -> dict[str, Any]:
    """SGLang's list form of /generate: texts with per-item sampling and logprob options."""
    body: dict[str, Any] = {
        "text": [item["text"] for item in items],
        "sampling_params": [item.get("sampling_params") or {} for item in items],
    }
    if any(item.get("return_logprob") for item in items):
        body["return_logprob"] = [bool(item.get("return_logprob")) for item in items]
        body["logprob_start_len"] = [
            -1 if item.get("logprob_start_len") is None else item["logprob_start_len"]
            for item in items
        ]
        body["top_logprobs_num"] = [item.get("top_logprobs_num") or 0 for item in items]
    if any(item.get("return_text_in_logprobs") for item in items):
        body["return_text_in_logprobs"] = True
    return body


def _split_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A list-form body with shared options as single-form items (one per text)."""
    shared = {k: v for k, v in body.items() if k != "text"}
    return [{"text": text, **shared} for text in body["text"]]


def choices_method_needs_unconditional(request: SelectRequest) -> bool:
    return bool(getattr(request.choices_method, "requires_unconditional_logprobs", False))


def _meta(answer: Any, url: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
        raise TransportError(f"{url}/generate answered without meta_info")
    return answer["meta_info"]


def _triple(entry: Any) -> list[Any]:
    values = list(entry) + [None] * (3 - len(entry))
    return values[:3]


def _choice_tokens(
    meta: dict[str, Any], prompt: str, choice: str, prompt_len: int
) -> list[list[Any]]:
    """The (logprob, token_id, text) entries of ``choice`` from a scoring answer: entries that
    lie wholly inside the prompt are dropped; one that straddles the prompt's end (a healed
    token) is kept. Uses the token texts when the server sent them, else token counts."""
    entries = [_triple(e) for e in (meta.get("input_token_logprobs") or [])]
    texts = [e[2] for e in entries]
    if entries and all(isinstance(t, str) for t in texts):
        joined = "".join(texts)
        if joined.endswith(choice) and len(joined) >= len(choice):
            boundary = len(joined) - len(choice)  # where the choice starts in ``joined``
            position = 0
            keep_from = len(entries)
            for index, text in enumerate(texts):
                if position + len(text) > boundary:
                    keep_from = index
                    break
                position += len(text)
            return entries[keep_from:]
    total = int(meta.get("prompt_tokens") or 0)
    first_position = total - len(entries)
    return entries[max(0, prompt_len - first_position) :]


from sglrun.backends.sglang_runtime import Runtime  # noqa: E402 - where SGLang keeps it too
