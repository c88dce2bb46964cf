"""One pooled HTTP transport shared by the server backends.

``HTTPTransport`` sends JSON requests over a urllib3 keep-alive pool, retries what is worth
retrying (connection errors, 408, 429 and 5xx; never another 4xx) with exponential backoff and
full jitter, honours ``Retry-After``, stops after ``retries`` retries or ``retry_time`` seconds,
whichever comes first, and turns failures into ``ServerError`` (carrying the server's own
message) or ``TransportError``. ``stream`` reads Server-Sent Events. With several base URLs an
``EndpointPool`` spreads requests over them and rests an endpoint that fails.

Secrets (API keys) travel in headers only and are masked in every message, repr and log line.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError, SSLError

from sglrun.errors import InvalidArgumentError, ServerError, TransportError
from sglrun.lang.hub import current_hub, run_blocking

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_RETRY_TIME",
    "DEFAULT_TIMEOUT",
    "EndpointPool",
    "HTTPTransport",
    "SSEEvent",
    "TransportStats",
    "error_message",
]

logger = logging.getLogger("sglrun.http")

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 600.0)  # (connect, read) seconds
DEFAULT_RETRIES = 4
DEFAULT_RETRY_TIME = 120.0
RETRY_STATUSES = frozenset({408, 429})
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "proxy-authorization"})
_MASK = "***"


class SSEEvent(NamedTuple):
    """One Server-Sent Event: its ``event:`` name (None when unnamed) and parsed ``data:``."""

    event: str | None
    data: Any


@dataclasses.dataclass
class TransportStats:
    """Counters the CLI reads: requests sent (attempts), retries, requests that failed."""

    requests: int = 0
    retries: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Endpoint:
    url: str
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
        cleaned = [str(u).rstrip("/") for u in urls if str(u).strip()]
        if not cleaned:
            raise InvalidArgumentError("at least one server URL is needed")
        for url in cleaned:
            if not url.startswith(("http://", "https://")):
                raise InvalidArgumentError(f"server URL must start with http:// or https://: {url}")
        self.endpoints = [_Endpoint(url) for url in cleaned]
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
                        "endpoint %s rests for %.1f s after a failure", endpoint.url,
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


def _retry_after_seconds(value: str | None) -> float | None:
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


def _as_timeout(timeout: Any) -> urllib3.Timeout:
    if isinstance(timeout, urllib3.Timeout):
        return timeout
    if isinstance(timeout, (tuple, list)):
        connect, read = timeout
        return urllib3.Timeout(connect=connect, read=read)
    if isinstance(timeout, (int, float)):
        return urllib3.Timeout(connect=min(float(timeout), DEFAULT_TIMEOUT[0]), read=timeout)
    raise InvalidArgumentError(f"timeout must be seconds or (connect, read), not {timeout!r}")


class _Failure(Exception):
    """Internal: one failed attempt, with what the retry loop needs to decide."""

    def __init__(
        self, error: Exception, retryable: bool, endpoint_failed: bool, wait: float | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.endpoint_failed = endpoint_failed
        self.wait = wait


class HTTPTransport:
    """JSON over HTTP with pooling, retries and endpoint balancing (thread-safe)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        headers: Mapping[str, str] | None = None,
        secrets: Iterable[str | None] = (),
        timeout: Any = DEFAULT_TIMEOUT,
        retries: int | None = DEFAULT_RETRIES,
        retry_time: float = DEFAULT_RETRY_TIME,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        retry_read_timeouts: bool = False,
        verify: bool | str | None = None,
        pool_maxsize: int = 64,
        cooldown: float = 5.0,
        max_cooldown: float = 300.0,
    ) -> None:
        retries = DEFAULT_RETRIES if retries is None else int(retries)
        if retries < 0:
            raise InvalidArgumentError("retries must be >= 0")
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.pool = EndpointPool(base_url, cooldown=cooldown, max_cooldown=max_cooldown)
        self._headers = {"Accept": "application/json", **dict(headers or {})}
        found = [v for k, v in self._headers.items() if k.lower() in SECRET_HEADERS]
        found += [v.split(" ", 1)[1] for v in list(found) if " " in v]
        self._secrets = sorted(
            {s for s in [*found, *secrets] if s and len(s) >= 4}, key=len, reverse=True
        )
        self.timeout = _as_timeout(timeout)
        self.retries = retries
        self.retry_time = retry_time
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_read_timeouts = retry_read_timeouts
        pool_kw: dict[str, Any] = {}
        if verify is False:
            pool_kw["cert_reqs"] = "CERT_NONE"
            pool_kw["assert_hostname"] = False
        else:
            pool_kw["cert_reqs"] = "CERT_REQUIRED"
            if isinstance(verify, str):
                pool_kw["ca_certs"] = verify
        self.verify = verify if verify is not None else True
        self._http = urllib3.PoolManager(
            num_pools=max(10, 2 * len(self.pool)), maxsize=pool_maxsize, block=False, **pool_kw
        )
        self._stats = TransportStats()
        self._stats_lock = threading.Lock()

    # ----------------------------------------------------------------- helpers
    @property
    def stats(self) -> TransportStats:
        with self._stats_lock:
            return dataclasses.replace(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def redact(self, text: str) -> str:
        """``text`` with every secret this transport carries replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def __repr__(self) -> str:
        shown = {
            k: (_MASK if k.lower() in SECRET_HEADERS else v)
            for k, v in self._headers.items()
            if k.lower() != "accept"
        }
        return f"HTTPTransport(endpoints={self.pool.urls!r}, headers={shown!r})"

    def close(self) -> None:
        self._http.clear()

    # ---------------------------------------------------------------- requests
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Send a request and return the parsed JSON answer (or its text if not JSON)."""
        # A program on a hub waits on a worker thread, never on the hub's.
        return run_blocking(self._request, method, path, body, timeout, headers)

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Any,
        headers: Mapping[str, str] | None,
    ) -> Any:
        response, endpoint = self._send(method, path, body, timeout, headers, stream=False)
        data = response.data
        content_type = response.headers.get("Content-Type", "")
        if not data:
            return None
        if "json" in content_type or data[:1] in (b"{", b"["):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if "json" in content_type:
                    raise TransportError(
                        f"{method} {endpoint.url}{path}: the server sent invalid JSON ({exc})"
                    ) from None
        return data.decode("utf-8", "replace")

    def stream(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[SSEEvent]:
        """Send a request and yield its Server-Sent Events until ``data: [DONE]`` or the end of
        the body. An ``error`` event (or a data payload that is only an error) raises
        ``ServerError``. Retries happen only before the first byte of the body is read.
        On a hub the whole stream is read on a worker thread, then replayed."""
        hub = current_hub()
        if hub is not None:
            yield from hub.call_blocking(
                lambda: list(self.stream(method, path, body, timeout=timeout, headers=headers))
            )
            return
        hdrs = {"Accept": "text/event-stream", **dict(headers or {})}
        response, endpoint = self._send(method, path, body, timeout, hdrs, stream=True)
        url = endpoint.url + path
        finished = False
        try:
            for event in _parse_sse(_iter_lines(response)):
                _raise_stream_error(event, url, self.redact)
                yield event
            finished = True
        except Urllib3Error as exc:
            self._count(failures=1)
            raise TransportError(
                self.redact(f"{method} {url}: the stream broke: {type(exc).__name__}: {exc}")
            ) from None
        finally:
            reusable = False
            if finished:  # read what follows [DONE] (the last chunk) so the connection is clean
                try:
                    response.drain_conn()
                    reusable = True
                except Exception:  # noqa: BLE001 - a connection we cannot clean is dropped
                    reusable = False
            if not reusable:
                response.close()
            response.release_conn()
            self.pool.release(endpoint, failed=False)

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Any,
        headers: Mapping[str, str] | None,
        *,
        stream: bool,
    ) -> tuple[Any, _Endpoint]:
        payload = orjson.dumps(body) if body is not None else None
        hdrs = dict(self._headers)
        if payload is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        request_timeout = _as_timeout(timeout) if timeout is not None else self.timeout
        started = time.monotonic()
        attempt = 0
        while True:
            endpoint = self.pool.acquire()
            url = endpoint.url + path
            self._count(requests=1)
            try:
                response = self._attempt(
                    method, url, payload, hdrs, request_timeout, stream=stream
                )
            except _Failure as failure:
                self.pool.release(endpoint, failed=failure.endpoint_failed)
                delay = failure.wait
                if delay is None:
                    delay = random.uniform(0.0, min(self.max_backoff, self.backoff * 2**attempt))
                elapsed = time.monotonic() - started
                if (
                    not failure.retryable
                    or attempt >= self.retries
                    or elapsed + delay > self.retry_time
                ):
                    self._count(failures=1)
                    raise failure.error from None
                attempt += 1
                self._count(retries=1)
                logger.info(
                    "retry %d/%d of %s %s in %.2f s: %s",
                    attempt, self.retries, method, url, delay, failure.error,
                )
                time.sleep(delay)
                continue
            if not stream:
                self.pool.release(endpoint, failed=False)
            return response, endpoint

    def _attempt(
        self,
        method: str,
        url: str,
        payload: bytes | None,
        headers: dict[str, str],
        timeout: urllib3.Timeout,
        *,
        stream: bool,
    ) -> Any:
        try:
            response = self._http.request(
                method,
                url,
                body=payload,
                headers=headers,
                timeout=timeout,
                retries=False,
                redirect=False,
                preload_content=not stream,
            )
        except ReadTimeoutError:
            error = TransportError(
                f"{method} {url}: no answer within {timeout.read_timeout} s (read timeout)"
            )
            raise _Failure(error, self.retry_read_timeouts, endpoint_failed=False) from None
        except SSLError as exc:
            error = TransportError(self.redact(f"{method} {url}: TLS error: {exc}"))
            raise _Failure(error, retryable=False, endpoint_failed=True) from None
        except Urllib3Error as exc:
            reason = getattr(exc, "reason", None) or exc
            error = TransportError(
                self.redact(f"{method} {url}: connection failed: {type(exc).__name__}: {reason}")
            )
            raise _Failure(error, retryable=True, endpoint_failed=True) from None
        status = response.status
        if status < 400:
            return response
        try:
            body = response.data if not stream else response.read()
        except Urllib3Error:
            body = b""
        finally:
            if stream:
                response.release_conn()
        error = ServerError(status, self.redact(error_message(body)), url)
        retryable = status in RETRY_STATUSES or status >= 500
        wait = _retry_after_seconds(response.headers.get("Retry-After")) if retryable else None
        raise _Failure(error, retryable, endpoint_failed=status >= 500, wait=wait)


# ---------------------------------------------------------------------------- SSE
def _iter_lines(response: Any) -> Iterator[str]:
    buffer = b""
    read1 = getattr(response, "read1", None)
    chunks = iter(lambda: read1(65536), b"") if read1 else response.stream(4096)
    for chunk in chunks:
        if not chunk:
            break
        buffer += chunk
        while True:
            index = buffer.find(b"\n")
            if index < 0:
                break
            line, buffer = buffer[:index], buffer[index + 1 :]
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", "replace")


def _parse_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                joined = "\n".join(data)
                if joined.strip() == "[DONE]":
                    return
                yield SSEEvent(event, _maybe_json(joined))
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "error":  # llama.cpp reports stream errors as "error: {...}"
            event = "error"
            data.append(value)
    if data:
        joined = "\n".join(data)
        if joined.strip() != "[DONE]":
            yield SSEEvent(event, _maybe_json(joined))


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


def _raise_stream_error(event: SSEEvent, url: str, redact: Any) -> None:
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
