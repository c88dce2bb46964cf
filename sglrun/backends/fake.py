"""A scripted backend for tests and dry runs: replies from a script, records every call.

It is a real ``Backend``: the interpreter drives it exactly as it drives a model, so tests of
the language run in milliseconds and can assert on what was sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sglrun.lang.backend import (
    Backend,
    ChunkCallback,
    GenerateRequest,
    GenerateResult,
    SelectRequest,
)
from sglrun.lang.chat_template import ChatTemplate, get_chat_template
from sglrun.lang.choices import ChoicesDecision, decide

if TYPE_CHECKING:
    from sglrun.lang.registry import BackendOptions

__all__ = ["FakeBackend"]

Reply = str | list[str] | BaseException
Script = Iterable[Reply] | Mapping[str, Reply] | Callable[[GenerateRequest], Reply]


class FakeBackend(Backend):
    """Replies to ``generate`` from ``replies``: a list used in order (cycling when
    ``cycle=True``), a mapping from variable name to reply, or a function of the request.
    A reply that is an exception is raised. ``select`` picks by ``choose`` (a function of the
    request returning the choice), else the first choice. ``delay`` simulates latency."""

    name = "fake"

    def __init__(
        self,
        replies: Script | None = None,
        *,
        choose: Callable[[SelectRequest], str] | None = None,
        chat_template: ChatTemplate | str = "default",
        delay: float = 0.0,
        cycle: bool = False,
        placeholders: bool = False,
        is_chat_model: bool = False,
    ) -> None:
        self._script = replies
        self._sequence = list(replies) if isinstance(replies, (list, tuple)) else None
        self._cursor = 0
        self._cycle = cycle
        self._choose = choose
        self._placeholders = placeholders
        self.delay = delay
        self.cooperative = not delay  # a delay sleeps: run it on the hub's worker threads
        self.is_chat_model = is_chat_model
        self.template = (
            get_chat_template(chat_template) if isinstance(chat_template, str) else chat_template
        )
        self.calls: list[GenerateRequest | SelectRequest] = []
        self.cached_prefixes: list[str] = []
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        # Scripted replies depend on the call order, not the request: not cached, unless a
        # test names the script (then only calls to an instance with that name replay).
        self.cache_token: str | None = None

    def cache_identity(self) -> dict[str, Any] | None:
        """None (never cached) unless ``cache_token`` names the script."""
        return None if self.cache_token is None else {"backend": "fake", "script": self.cache_token}

    @classmethod
    def from_options(cls, options: BackendOptions) -> FakeBackend:
        """``--backend fake`` (tests): replies from ``SGLRUN_FAKE_REPLIES`` (a JSON list,
        cycled; an item ``{"error": "..."}`` fails that call), ``SGLRUN_FAKE_DELAY`` seconds
        per call."""
        import json
        import os

        from sglrun.errors import BackendError, InputError

        text = os.environ.get("SGLRUN_FAKE_REPLIES", '["ok"]')
        try:
            items = json.loads(text)
            delay = float(os.environ.get("SGLRUN_FAKE_DELAY", "0") or 0)
        except ValueError as exc:
            raise InputError(f"SGLRUN_FAKE_REPLIES / SGLRUN_FAKE_DELAY: {exc}") from None
        if not isinstance(items, list) or not items:
            raise InputError("SGLRUN_FAKE_REPLIES must be a non-empty JSON list")
        replies: list[Any] = [
            BackendError(str(item["error"])) if isinstance(item, dict) else str(item)
            for item in items
        ]
        return cls(replies, cycle=True, delay=delay)

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    def cache_prefix(self, prefix: str) -> None:
        self.cached_prefixes.append(prefix)

    def _next_reply(self, request: GenerateRequest) -> Reply:
        if self._placeholders:
            return "{" + (request.name or "gen") + "}"
        script = self._script
        if script is None:
            return "ok"
        if callable(script):
            return script(request)
        if isinstance(script, Mapping):
            return script.get(request.name or "", "ok")
        assert self._sequence is not None
        with self._lock:
            if self._cursor >= len(self._sequence):
                if not self._cycle or not self._sequence:
                    raise RuntimeError("FakeBackend ran out of scripted replies")
                self._cursor = 0
            reply = self._sequence[self._cursor]
            self._cursor += 1
        return reply

    def _enter(self, request: GenerateRequest | SelectRequest) -> None:
        with self._lock:
            self.calls.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        self._enter(request)
        try:
            streaming = on_chunk is not None
            if self.delay and not streaming:
                time.sleep(self.delay)
            reply = self._next_reply(request)
            if isinstance(reply, BaseException):
                raise reply
            params = request.params
            if isinstance(reply, str) and (params.n or 1) > 1:
                reply = [reply] * int(params.n or 1)
            if isinstance(reply, str):
                reply, matched = _apply_stop(reply, params.stop or ())
                if on_chunk is not None:
                    pieces = _chunks(reply)
                    for piece in pieces:  # the delay is spread over the chunks, as a model would
                        if self.delay:
                            time.sleep(self.delay / len(pieces))
                        on_chunk(piece)
            else:
                matched = None
            meta: dict[str, Any] = {
                "prompt_tokens": len(request.prompt.split()),
                "completion_tokens": len(str(reply).split()),
                "finish_reason": {"type": "stop", "matched": matched}
                if matched is not None
                else {"type": "length", "length": params.max_new_tokens},
            }
            return GenerateResult(reply, meta)
        finally:
            self._leave()

    def select(self, request: SelectRequest) -> ChoicesDecision:
        self._enter(request)
        try:
            if self.delay:
                time.sleep(self.delay)
            chosen = self._choose(request) if self._choose else request.choices[0]
            scores = [
                [(0.0 if choice == chosen else -5.0, index, choice)]
                for index, choice in enumerate(request.choices)
            ]
            unconditional = (
                [[(None, i, c)] for i, c in enumerate(request.choices)]
                if request.choices_method.requires_unconditional_logprobs
                else None
            )
            return decide(request.choices_method, request.choices, scores, unconditional)
        finally:
            self._leave()


def _apply_stop(text: str, stops: Iterable[str]) -> tuple[str, str | None]:
    best: tuple[int, str] | None = None
    for stop in stops:
        position = text.find(stop) if stop else -1
        if position >= 0 and (best is None or position < best[0]):
            best = (position, stop)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


def _chunks(text: str) -> list[str]:
    """Split into word-sized pieces the way a model streams tokens."""
    pieces, current = [], ""
    for char in text:
        if char == " " and current:
            pieces.append(current)
            current = ""
        current += char
    if current:
        pieces.append(current)
    return pieces
