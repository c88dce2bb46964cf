"""A loopback stand-in for Anthropic's Messages API (POST /v1/messages), written to the
documented request and response shapes: ``x-api-key`` and ``anthropic-version`` headers,
top-level ``system``, ``messages`` with user/assistant roles (a final assistant message is a
prefill the model continues), ``max_tokens``, ``stop_sequences``, streaming SSE events, and
error bodies ``{"type": "error", "error": {"type": ..., "message": ...}}``.

The "model" answers ``reply`` (default: "You said: " + the last user text), or
``PREFILL_REPLY`` when the last message is an assistant prefill. A token is a word.
"""

from __future__ import annotations

import json
from typing import Any

from sglang_stub import StubServer, tokenize

__all__ = ["AnthropicStub", "PREFILL_REPLY", "error_body"]

PREFILL_REPLY = " 42, as everyone knows."


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(block.get("text", "") for block in content if block.get("type") == "text")


class AnthropicStub(StubServer):
    def __init__(self, api_key: str = "ant-test-key", models: tuple[str, ...] = (
            "claude-test",)) -> None:
        super().__init__()
        self.api_key = api_key
        self.models = models
        self.reply: str | None = None
        self.stream_error: dict[str, Any] | None = None

    def route(self, handler: Any, method: str, path: str, body: Any) -> None:
        if path != "/v1/messages" or method != "POST":
            handler.send_json(404, error_body("not_found_error", f"Not found: {path}"))
            return
        if handler.headers.get("x-api-key") != self.api_key:
            handler.send_json(401, error_body("authentication_error", "invalid x-api-key"))
            return
        if not handler.headers.get("anthropic-version"):
            handler.send_json(400, error_body("invalid_request_error",
                                              "anthropic-version: header is required"))
            return
        problem = self.validate(body)
        if problem:
            status, kind, message = problem
            handler.send_json(status, error_body(kind, message))
            return
        words, stop_reason, stop_sequence = self.answer(body)
        usage_in = sum(len(tokenize(_text(m["content"]))) for m in body["messages"])
        usage_in += len(tokenize(body.get("system", "")))
        if body.get("stream"):
            self.stream(handler, body, words, stop_reason, stop_sequence, usage_in)
            return
        handler.send_json(200, {
            "id": "msg_stub", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": usage_in, "output_tokens": len(words)},
        })

    def validate(self, body: Any) -> tuple[int, str, str] | None:
        if not isinstance(body, dict):
            return 400, "invalid_request_error", "body must be a JSON object"
        if body.get("model") not in self.models:
            return 404, "not_found_error", f"model: {body.get('model')}"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return 400, "invalid_request_error", "max_tokens: must be at least 1"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, "invalid_request_error", "messages: at least one message is required"
        for message in messages:
            if message.get("role") not in ("user", "assistant"):
                return 400, "invalid_request_error", (
                    f"messages: Unexpected role \"{message.get('role')}\". Allowed roles are "
                    "\"user\" or \"assistant\". For instructions or context, use the top-level "
                    "`system` parameter.")
        last = messages[-1]
        if last["role"] == "assistant" and _text(last["content"]) != \
                _text(last["content"]).rstrip():
            return 400, "invalid_request_error", (
                "messages: final assistant content cannot end with trailing whitespace")
        if "temperature" in body and "top_p" in body:
            return 400, "invalid_request_error", (
                "`temperature` and `top_p` cannot both be specified for this model.")
        return None

    def answer(self, body: dict[str, Any]) -> tuple[list[str], str, str | None]:
        last = body["messages"][-1]
        if self.reply is not None:
            text = self.reply
        elif last["role"] == "assistant":
            text = PREFILL_REPLY
        else:
            text = "You said: " + _text(last["content"])
        stop_reason, stop_sequence = "end_turn", None
        for stop in body.get("stop_sequences") or []:
            at = text.find(stop)
            if at >= 0:
                text, stop_reason, stop_sequence = text[:at], "stop_sequence", stop
                break
        words = tokenize(text)
        if len(words) > body["max_tokens"]:
            words, stop_reason, stop_sequence = words[: body["max_tokens"]], "max_tokens", None
        return words, stop_reason, stop_sequence

    def stream(self, handler: Any, body: dict[str, Any], words: list[str], stop_reason: str,
               stop_sequence: str | None, usage_in: int) -> None:
        def send(event: str, data: dict[str, Any]) -> None:
            handler.send_chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n")

        handler.start_sse()
        send("message_start", {"type": "message_start", "message": {
            "id": "msg_stub", "type": "message", "role": "assistant", "content": [],
            "model": body["model"], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": usage_in, "output_tokens": 1}}})
        send("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})
        send("ping", {"type": "ping"})
        for index, word in enumerate(words):
            if self.stream_error is not None and index == 1:
                send("error", self.stream_error)
                handler.end_chunks()
                return
            send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": word}})
        send("content_block_stop", {"type": "content_block_stop", "index": 0})
        send("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": len(words)}})
        send("message_stop", {"type": "message_stop"})
        handler.end_chunks()
