"""``Anthropic``: Claude models over the Messages API (POST /v1/messages).

The system turn becomes the top-level ``system``; the open assistant turn, when it has text,
is sent as a prefilled assistant message that the model continues. Streaming reads the SSE
events (message_start, content_block_delta/text_delta, message_delta, message_stop).
The API has no regex or log-probabilities: those raise ``UnsupportedCapabilityError``;
``select`` generates and matches the text to a choice. A ``json_schema`` goes as the one tool
the model must call (``tool_choice``), and the tool call's input is the JSON text.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

import orjson

from sglrun.backends.common import TokenUsage, batch_options, match_choice, parse_json_schema
from sglrun.backends.http import DEFAULT_RETRIES, DEFAULT_TIMEOUT, HTTPTransport
from sglrun.errors import InvalidArgumentError, TransportError, UnsupportedCapabilityError
from sglrun.lang.backend import (
    Backend,
    ChunkCallback,
    GenerateRequest,
    GenerateResult,
    SelectRequest,
)
from sglrun.lang.choices import ChoicesDecision
from sglrun.lang.hub import map_concurrently
from sglrun.lang.ir import SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.registry import BackendOptions

__all__ = ["Anthropic"]

logger = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
JSON_TOOL = "json_output"  # the tool a json_schema becomes
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)$", re.DOTALL)


class Anthropic(Backend):
    """Claude through the Messages API. The key comes from ``api_key`` or
    ``$ANTHROPIC_API_KEY`` and travels only in the ``x-api-key`` header."""

    name = "Anthropic"
    is_chat_model = True
    cooperative = True  # its HTTP waits park on the hub

    def __init__(
        self,
        model_name: str,
        api_key: str | None = None,
        *,
        base_url: str | list[str] = "https://api.anthropic.com",
        timeout: Any = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        verify: bool | str | None = None,
        batch: bool = False,
        batch_jobs: str | None = None,
        batch_poll: float | None = None,
    ) -> None:
        key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise InvalidArgumentError(
                "the Anthropic API needs a key: pass api_key= or set ANTHROPIC_API_KEY"
            )
        self.model_name = model_name
        self.transport = HTTPTransport(
            base_url,
            headers={"x-api-key": key, "anthropic-version": API_VERSION},
            timeout=timeout,
            retries=retries,
            verify=verify,
        )
        self.token_usage = TokenUsage()
        self._warned: set[str] = set()
        self.batch = bool(batch)
        if self.batch:  # Message Batches at half the price: see batch_api
            from sglrun.backends.batch_api import batch_transport
            from sglrun.backends.batch_providers import AnthropicBatchAPI

            api = AnthropicBatchAPI(self.transport)
            paths = ["/v1/messages"]
            self.transport = batch_transport(self.transport, api, paths, batch_jobs, batch_poll)  # type: ignore[assignment]  # same surface

    @classmethod
    def from_options(cls, options: BackendOptions) -> Anthropic:
        """``--backend anthropic --model NAME``; the key from the configured variable."""
        extra = options.transport_settings()
        urls = list(options.urls)
        if urls:
            extra["base_url"] = urls if len(urls) > 1 else urls[0]
        assert options.model is not None  # the registry entry says needs_model
        extra.update(batch_options(options))
        return cls(options.model, api_key=options.api_key, verify=options.verify, **extra)

    def __repr__(self) -> str:
        return f"Anthropic({self.model_name!r}, {self.transport.pool.urls!r})"

    def cache_identity(self) -> dict[str, Any]:
        """The model, and the server when it is not Anthropic's own (a proxy). No key."""
        from sglrun.backends.http_support import mask_url

        urls = sorted(map(mask_url, self.transport.pool.urls))
        servers = None if urls == ["https://api.anthropic.com"] else urls
        return {"backend": "anthropic", "model": self.model_name, "servers": servers}

    def get_model_name(self) -> str:
        return self.model_name

    #: The Messages API has no grammar, logprobs or stop tokens; ``n`` is asked n times at
    #: once, and a schema is a forced tool call.
    capabilities = frozenset({"images", "select", "prefill", "n", "json_schema"})

    def capability_hint(self, capability: str) -> str:
        return f"the Messages API has no {capability.replace('_', ' ')}"

    def concurrency_hint(self) -> int:
        """16 programs in flight: the API's rate limits bind long before its capacity. In batch
        mode, enough for every row to join one batch."""
        if self.batch:
            from sglrun.backends.batch_api import BATCH_IN_FLIGHT

            return BATCH_IN_FLIGHT
        return 16

    def get_chat_template(self) -> Any:
        from sglrun.lang.chat_template import get_chat_template

        return get_chat_template("claude")

    @property
    def stats(self) -> Any:
        return self.transport.stats

    def shutdown(self) -> None:
        self.transport.close()

    # -------------------------------------------------------------- payload
    def _unsupported(self, capability: str) -> UnsupportedCapabilityError:
        return UnsupportedCapabilityError(
            capability, self.name, "the Messages API has no such parameter"
        )

    def _params(self, params: SamplingParams) -> dict[str, Any]:
        for capability in ("regex", "dtype"):
            if getattr(params, capability) is not None:
                raise self._unsupported(capability)
        if params.stop_regex:
            raise self._unsupported("stop_regex")
        if params.stop_token_ids:
            raise self._unsupported("stop_token_ids")
        if params.return_logprob:
            raise self._unsupported("return_logprob")
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": params.max_new_tokens or 128,
        }
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        if params.json_schema is not None:
            schema = parse_json_schema(params.json_schema)
            body["tools"] = [{"name": JSON_TOOL, "description": "Give the answer as this JSON.",
                              "input_schema": schema}]  # fmt: skip
            body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        # Newer models refuse temperature and top_p together: top_p goes only when it is set
        # (< 1), and then the default temperature (1.0) stays out.
        nucleus = params.top_p is not None and params.top_p < 1.0
        if params.temperature is not None and not (nucleus and params.temperature == 1.0):
            body["temperature"] = params.temperature
        if nucleus:
            body["top_p"] = params.top_p
        if params.top_k is not None and params.top_k > 0:
            body["top_k"] = params.top_k
        for name, value in (
            ("frequency_penalty", params.frequency_penalty),
            ("presence_penalty", params.presence_penalty),
            ("min_p", params.min_p),
            ("min_new_tokens", params.min_new_tokens),
            ("ignore_eos", params.ignore_eos),
        ):
            if value and name not in self._warned:
                self._warned.add(name)
                logger.warning("Anthropic backend: %s=%s is ignored (not in the API)", name, value)
        return body

    def _messages(self, request: GenerateRequest | SelectRequest, body: dict[str, Any]) -> str:
        """Fill ``body`` with system and messages; returns the whitespace cut from the end of
        the prefill (the API refuses a final assistant turn ending in whitespace)."""
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            if message["role"] == "system":
                system.append(_text(message["content"]))
            else:
                messages.append({"role": message["role"], "content": _content(message["content"])})
        if not request.messages and request.role is None:
            messages.append({"role": "user", "content": request.prompt})
        cut = ""
        if request.role not in (None, "assistant"):
            raise UnsupportedCapabilityError(
                f"gen inside a {request.role} turn",
                self.name,
                "Claude generates only in an assistant turn (use sgl.assistant)",
            )
        if request.role == "assistant" and request.role_text.strip():
            prefill = request.role_text.rstrip()
            cut = request.role_text[len(prefill) :]
            messages.append({"role": "assistant", "content": prefill})
        referenced = {
            _image_key(part)
            for m in messages
            if isinstance(m["content"], list)
            for part in m["content"]
        }
        extra = [img for img in request.images if img.base64_data not in referenced]
        if extra:
            target = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if target is None:
                target = {"role": "user", "content": []}
                messages.insert(0, target)
            content = target["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            target["content"] = parts + [
                {
                    "type": "image",
                    "source": {
                        "type": "base64",
                        "media_type": img.mime_type,
                        "data": img.base64_data,
                    },
                }
                for img in extra
            ]
        if system:
            body["system"] = "\n\n".join(system)
        body["messages"] = messages
        return cut

    # -------------------------------------------------------------- generate
    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        n = request.params.n or 1
        if n > 1:  # the API has no n: ask n times, at once (one batch round in batch mode)
            single = _with_n1(request)
            results = map_concurrently(lambda _: self.generate(single), list(range(n)))
            meta = dict(results[0].meta_info)
            meta["completion_tokens"] = sum(
                r.meta_info.get("completion_tokens") or 0 for r in results
            )
            meta["finish_reasons"] = [r.meta_info.get("finish_reason") for r in results]
            return GenerateResult([str(r.text) for r in results], meta)
        body = self._params(request.params)
        cut = self._messages(request, body)
        if on_chunk is not None and not self.batch and "tools" not in body:
            return self._stream(body, cut, on_chunk)
        result = self._generated(body, cut)
        if on_chunk is not None and isinstance(result.text, str) and result.text:
            on_chunk(result.text)  # batch mode: the whole answer as one chunk
        return result

    def _generated(self, body: dict[str, Any], cut: str) -> GenerateResult:
        answer = self.transport.request("POST", "/v1/messages", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("content"), list):
            raise TransportError("/v1/messages answered without content")
        text = "".join(_block_text(block) for block in answer["content"])
        usage = answer.get("usage") or {}
        self.token_usage.add(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        return GenerateResult(
            _restore(text, cut),
            {
                "id": answer.get("id"),
                "prompt_tokens": usage.get("input_tokens"),
                "completion_tokens": usage.get("output_tokens"),
                "finish_reason": _finish(
                    answer.get("stop_reason"), answer.get("stop_sequence"), body
                ),
            },
        )

    def _stream(self, body: dict[str, Any], cut: str, on_chunk: ChunkCallback) -> GenerateResult:
        body = {**body, "stream": True}
        text, ident = "", None
        input_tokens = output_tokens = 0
        stop_reason = stop_sequence = None
        first = True
        for event in self.transport.stream("POST", "/v1/messages", body):
            data = event.data if isinstance(event.data, dict) else {}
            kind = event.event or data.get("type")
            if kind == "message_start":
                message = data.get("message") or {}
                ident = message.get("id")
                usage = message.get("usage") or {}
                input_tokens = usage.get("input_tokens", 0)
                output_tokens = usage.get("output_tokens", 0)
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    piece = delta["text"]
                    if first:
                        piece = _restore(piece, cut)
                        first = not piece
                    if piece:
                        text += piece
                        on_chunk(piece)
            elif kind == "message_delta":
                delta = data.get("delta") or {}
                stop_reason = delta.get("stop_reason", stop_reason)
                stop_sequence = delta.get("stop_sequence", stop_sequence)
                usage = data.get("usage") or {}
                output_tokens = usage.get("output_tokens", output_tokens)
                input_tokens = usage.get("input_tokens") or input_tokens
            elif kind == "message_stop":
                break
        self.token_usage.add(input_tokens, output_tokens)
        return GenerateResult(
            text,
            {
                "id": ident,
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "finish_reason": _finish(stop_reason, stop_sequence, body),
            },
        )

    # ---------------------------------------------------------------- select
    def select(self, request: SelectRequest) -> ChoicesDecision:
        """No log-probabilities here: generate (greedy) and match the text to a choice."""
        choices = list(request.choices)
        if not choices:
            raise InvalidArgumentError("select needs at least one choice")
        params = SamplingParams.defaults(
            max_new_tokens=max(len(c) for c in choices) + 8, temperature=request.temperature
        )
        generate = GenerateRequest(
            prompt=request.prompt,
            params=params,
            messages=request.messages,
            role=request.role,
            role_text=request.role_text,
            images=request.images,
        )
        text = str(self.generate(generate).text)
        decision, how = match_choice(text, choices)
        return ChoicesDecision(decision, {"strategy": "generate", **how})


# -------------------------------------------------------------------- helpers
def _block_text(block: dict[str, Any]) -> str:
    """A text block's text; the JSON tool's call is its input as JSON text."""
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
        return orjson.dumps(block.get("input")).decode()
    return ""


def _with_n1(request: GenerateRequest) -> GenerateRequest:
    import dataclasses

    return dataclasses.replace(request, params=dataclasses.replace(request.params, n=1))


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _content(content: Any) -> Any:
    """OpenAI-style content parts (text, image_url with a data URL) as Anthropic blocks."""
    if not isinstance(content, list):
        return content
    blocks = []
    for part in content:
        if part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            match = _DATA_URL.match(url)
            if match:
                blocks.append(
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": match["mime"],
                            "data": match["data"],
                        },
                    }
                )
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        elif part.get("type") == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        else:
            blocks.append(part)
    return blocks


def _image_key(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") == "image":
        return (part.get("source") or {}).get("data")
    return None


def _restore(text: str, cut: str) -> str:
    """The prefill lost its trailing whitespace; the model's answer usually starts with it.
    Drop that leading whitespace so the program's text is not doubled."""
    if not cut:
        return text
    if text.startswith(cut):
        return text[len(cut) :]
    return text.lstrip() if text[:1].isspace() else text


def _finish(
    reason: str | None, sequence: str | None, body: dict[str, Any]
) -> dict[str, Any] | None:
    if reason is None:
        return None
    if reason == "max_tokens":
        return {"type": "length", "length": body.get("max_tokens")}
    if reason == "stop_sequence":
        return {"type": "stop", "matched": sequence}
    if reason == "end_turn":
        return {"type": "stop", "matched": None}
    return {"type": reason}
