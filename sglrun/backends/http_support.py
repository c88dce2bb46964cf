"""Pieces of the HTTP transport that need no network: endpoints, error texts, SSE, timeouts.

``EndpointPool`` spreads requests over equivalent servers and rests one that fails; a URL's own
credentials (``http://user:password@host``) are taken out of it, sent as HTTP basic auth, and
counted as secrets. ``SSEParser`` reads Server-Sent Events line by line.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import orjson

from sglrun.errors import InvalidArgumentError, ServerError

__all__ = [
    "DEFAULT_TIMEOUT",
    "EndpointPool",
    "SSEEvent",
    "SSEParser",
    "Timeout",
    "error_message",
    "mask_url",
    "parse_sse",
    "raise_stream_error",
    "retry_after_seconds",
    "split_credentials",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 600.0)  # (connect, read) seconds
MASK = "***"


@dataclasses.dataclass(frozen=True)
class Timeout:
    """Seconds to connect, to wait for each read, and for a whole attempt (connect, send and
    every read: a server that drips a byte at a time cannot hold a request past ``total``)."""

    connect_timeout: float
    read_timeout: float
    total: float

    @classmethod
    def of(cls, value: Any) -> Timeout:
        """From seconds (the whole attempt; connecting gets at most 10 of them), a
        ``(connect, read)`` pair (the attempt then gets both), or a Timeout."""
        if isinstance(value, Timeout):
            return value
        if value is None:
            value = DEFAULT_TIMEOUT
        if isinstance(value, (tuple, list)) and len(value) == 2:
            connect, read = (float(v) for v in value)
            if connect > 0 and read > 0:
                return cls(connect, read, connect + read)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return cls(min(float(value), DEFAULT_TIMEOUT[0]), float(value), float(value))
        raise InvalidArgumentError(f"timeout must be seconds > 0 or (connect, read), not {value!r}")


class SSEEvent(NamedTuple):
    """One Server-Sent Event: its ``event:`` name (None when unnamed) and parsed ``data:``."""

    event: str | None
    data: Any


_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it (``//user:password@``) masked."""
    return _CREDENTIALS.sub(lambda match: f"{match.group(1)}{MASK}@", text)


def split_credentials(url: str) -> tuple[str, str | None, list[str]]:
    """``url`` without ``user:password@``, the ``Authorization`` value they make (basic auth)
    and the secrets they contain (the password and the encoded pair), to be masked."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, []
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return clean, f"Basic {token}", [s for s in (password, token) if s]


@dataclasses.dataclass
class _Endpoint:
    url: str
    authorization: str | None = None  # basic auth from the URL's own credentials
    in_flight: int = 0
    cooldown_until: float = 0.0
    cooldown: float = 0.0
    failures: int = 0


class EndpointPool:
    """Several base URLs of equivalent servers. ``acquire`` picks the available endpoint with
    the fewest requests in flight; ``release(failed=True)`` rests it for a cool-down that
    doubles while it keeps failing. When every endpoint rests, the one back soonest is used."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        cooldown: float = 5.0,
        max_cooldown: float = 300.0,
        clock: Any = time.monotonic,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        given = [str(u).strip().rstrip("/") for u in urls if str(u).strip()]
        if not given:
            raise InvalidArgumentError("at least one server URL is needed")
        self.secrets: list[str] = []
        self.endpoints = []
        for raw in given:
            url, authorization, secrets = split_credentials(raw)
            self.secrets += secrets
            if not url.startswith(("http://", "https://")):
                shown = url if not secrets else url.replace("//", f"//{MASK}@", 1)
                raise InvalidArgumentError(
                    f"server URL must start with http:// or https://: {shown}"
                )
            self.endpoints.append(_Endpoint(url, authorization))
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._turn = 0

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.endpoints]

    def __len__(self) -> int:
        return len(self.endpoints)

    def acquire(self) -> _Endpoint:
        with self._lock:
            now = self._clock()
            count = len(self.endpoints)
            order = [self.endpoints[(self._turn + i) % count] for i in range(count)]
            self._turn = (self._turn + 1) % count
            ready = [e for e in order if e.cooldown_until <= now]
            if ready:
                chosen = min(ready, key=lambda e: e.in_flight)
            else:
                chosen = min(order, key=lambda e: e.cooldown_until)
            chosen.in_flight += 1
            return chosen

    def release(self, endpoint: _Endpoint, *, failed: bool) -> None:
        with self._lock:
            endpoint.in_flight = max(0, endpoint.in_flight - 1)
            if failed:
                endpoint.failures += 1
                endpoint.cooldown = min(
                    self.max_cooldown,
                    endpoint.cooldown * 2 if endpoint.cooldown else self.base_cooldown,
                )
                endpoint.cooldown_until = self._clock() + endpoint.cooldown
                if len(self.endpoints) > 1:
                    logger.info(
                        "endpoint %s rests for %.1f s after a failure",
                        endpoint.url,
                        endpoint.cooldown,
                    )
            else:
                endpoint.failures = 0
                endpoint.cooldown = 0.0
                endpoint.cooldown_until = 0.0

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            now = self._clock()
            return [
                {
                    "url": e.url,
                    "in_flight": e.in_flight,
                    "resting_for": max(0.0, e.cooldown_until - now),
                    "failures": e.failures,
                }
                for e in self.endpoints
            ]

    def __repr__(self) -> str:
        return f"EndpointPool({self.urls!r})"


def _message_from_json(data: Any) -> str | None:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("msg")
            if message:
                return str(message)
            return orjson.dumps(error).decode()
        if isinstance(error, str) and error:
            return error
        detail = data.get("detail")
        if isinstance(detail, str) and detail:
            return detail
        if isinstance(detail, list) and detail:  # FastAPI validation errors
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    where = ".".join(str(x) for x in item.get("loc", []))
                    parts.append(f"{where}: {item.get('msg', item)}" if where else str(item))
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        message = data.get("message")
        if isinstance(message, str) and message:
            return message
    return None


def error_message(body: bytes | str, limit: int = 500) -> str:
    """The server's own message from an error body: ``{"error": {"message"}}``,
    ``{"error": "..."}``, ``{"detail"}``, ``{"message"}``, or else the (shortened) text."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        message = _message_from_json(orjson.loads(text))
    except orjson.JSONDecodeError:
        message = None
    if message is None:
        message = text.strip() or "(empty response body)"
    return message if len(message) <= limit else message[:limit] + "..."


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class SSEParser:
    """Server-Sent Events from lines, one line at a time (``feed``); ``DONE`` after
    ``data: [DONE]``. llama.cpp reports stream errors as ``error: {...}`` lines."""

    DONE = SSEEvent("[DONE]", None)

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "error":
            self._event = "error"
            self._data.append(value)
        return None

    def finish(self) -> SSEEvent | None:
        """What a stream that ended without a blank line leaves."""
        return self._dispatch()

    def _dispatch(self) -> SSEEvent | None:
        event, data = self._event, self._data
        self._event, self._data = None, []
        if not data:
            return None
        joined = "\n".join(data)
        if joined.strip() == "[DONE]":
            return self.DONE
        return SSEEvent(event, _maybe_json(joined))


def parse_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Every event of a stream's lines, up to ``data: [DONE]``."""
    parser = SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is SSEParser.DONE:
            return
        if event is not None:
            yield event
    event = parser.finish()
    if event is not None and event is not SSEParser.DONE:
        yield event


def _maybe_json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


_ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def raise_stream_error(event: SSEEvent, url: str, redact: Any) -> None:
    data = event.data
    is_error = event.event == "error"
    if isinstance(data, dict) and "error" in data:
        if data.get("type") == "error" or not ({"choices", "text", "delta"} & data.keys()):
            is_error = True
    if not is_error:
        return
    error = data.get("error", data) if isinstance(data, dict) else data
    status = 500
    if isinstance(error, dict):
        code = error.get("code")
        if isinstance(code, int) and code >= 400:
            status = code
        else:
            status = _ERROR_TYPE_STATUS.get(str(error.get("type")), 500)
    message = _message_from_json(data) if isinstance(data, dict) else None
    raise ServerError(status, redact(message or str(data)), url)
