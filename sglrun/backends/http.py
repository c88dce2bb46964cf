"""One pooled HTTP transport shared by the server backends.

``HTTPTransport`` sends JSON requests with aiohttp on the process's one I/O loop
(``sglrun.backends.aio``): a program on a hub parks while its request is out, any other caller
waits in its own thread. It retries what is worth retrying (connection errors, 408, 429 and
5xx; never another 4xx) with exponential backoff (and jitter), waits at least what a
``Retry-After`` asks, stops after ``retries`` retries or ``retry_time`` seconds, whichever comes
first, and turns failures into ``ServerError`` (carrying the server's own message) or
``TransportError`` (``timed_out`` for a deadline). Every attempt has a total deadline (connect,
send and every read) and a cap on the size of the answer. ``stream`` reads Server-Sent Events. With
several base URLs an ``EndpointPool`` spreads requests over them and rests one that fails.

Secrets (API keys, a URL's own password) travel in headers only and are masked in every
message, repr and log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson

from sglrun.backends.aio import on_io_thread, run_async, spawn_async
from sglrun.backends.http_support import (
    DEFAULT_TIMEOUT,
    MASK,
    EndpointPool,
    SSEEvent,
    SSEParser,
    Timeout,
    error_message,
    parse_sse,
    raise_stream_error,
    retry_after_seconds,
)
from sglrun.errors import InvalidArgumentError, ServerError, TransportError
from sglrun.lang.hub import current_task

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_RETRY_TIME",
    "DEFAULT_TIMEOUT",
    "MAX_RESPONSE_BYTES",
    "EndpointPool",
    "HTTPTransport",
    "SSEEvent",
    "TransportStats",
    "error_message",
]

logger = logging.getLogger(__name__)

DEFAULT_RETRIES = 4
DEFAULT_RETRY_TIME = 120.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a JSON answer bigger than this is a broken server
RETRY_STATUSES = frozenset({408, 429})
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "proxy-authorization"})
_ERROR_BODY_BYTES = 1024 * 1024

_parse_sse = parse_sse  # the name the tests of the SSE format use


@dataclasses.dataclass
class TransportStats:
    """Counters the CLI reads: requests sent (attempts), retries, requests that failed."""

    requests: int = 0
    retries: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


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


class _Answer:
    """A response whose status is below 400: its body already read, or (streams) open."""

    __slots__ = ("content_type", "data", "response")

    def __init__(self, content_type: str, data: bytes, response: Any = None) -> None:
        self.content_type = content_type
        self.data = data
        self.response = response


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
        cooldown: float = 5.0,
        max_cooldown: float = 300.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        retries = DEFAULT_RETRIES if retries is None else int(retries)
        if retries < 0:
            raise InvalidArgumentError("retries must be >= 0")
        self.pool = EndpointPool(base_url, cooldown=cooldown, max_cooldown=max_cooldown)
        self._headers = {"Accept": "application/json", **dict(headers or {})}
        found = [v for k, v in self._headers.items() if k.lower() in SECRET_HEADERS]
        found += [v.split(" ", 1)[1] for v in list(found) if " " in v]
        self._secrets = sorted(
            {s for s in [*found, *secrets, *self.pool.secrets] if s and len(s) >= 4},
            key=len,
            reverse=True,
        )
        self.timeout = Timeout.of(timeout)
        self.retries = retries
        self.retry_time = retry_time
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retry_read_timeouts = retry_read_timeouts
        self.max_response_bytes = max_response_bytes
        self.verify = verify if verify is not None else True
        self._ssl: ssl.SSLContext | bool = True
        if verify is False:
            self._ssl = False
        elif isinstance(verify, str):
            self._ssl = ssl.create_default_context(cafile=verify)
        self._session: Any = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._stats = TransportStats()
        self._stats_lock = threading.Lock()

    # ----------------------------------------------------------------- helpers
    @property
    def probe_timeout(self) -> Timeout:
        """For a backend's start-up questions (model info, dialect): a server that accepts the
        connection and never answers fails within the connect timeout, not the read one."""
        seconds = self.timeout.connect_timeout
        return Timeout(seconds, seconds, seconds)

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
            text = text.replace(secret, MASK)
        return text

    def __repr__(self) -> str:
        shown = {
            k: (MASK if k.lower() in SECRET_HEADERS else v)
            for k, v in self._headers.items()
            if k.lower() != "accept"
        }
        return f"HTTPTransport(endpoints={self.pool.urls!r}, headers={shown!r})"

    def close(self) -> None:
        """Close the connections (waits briefly; safe to call more than once)."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        done = threading.Event()
        spawn_async(session.close, lambda value, error: done.set())
        if not on_io_thread() and current_task() is None:
            done.wait(2.0)

    async def _client(self) -> Any:
        """This transport's aiohttp session on the running loop (made on first use)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=0, ssl=self._ssl, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector, trust_env=False)
            # aiohttp silently resends an idempotent request once when a reused connection
            # drops; every attempt here is counted and bounded by our own retry policy.
            if hasattr(session, "_retry_connection"):
                session._retry_connection = False
            self._session, self._session_loop = session, loop
        return self._session

    # ---------------------------------------------------------------- requests
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: Any = None,
        headers: Mapping[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        """Send a request and return the parsed JSON answer (or its text if not JSON; its
        bytes with ``raw``). A ``bytes`` body goes as it is, with the caller's Content-Type."""
        return run_async(lambda: self._request(method, path, body, timeout, headers, raw))

    async def _request(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Any,
        headers: Mapping[str, str] | None,
        raw: bool = False,
    ) -> Any:
        answer, endpoint = await self._send(method, path, body, timeout, headers, stream=False)
        data = answer.data
        if raw:
            return data
        if not data:
            return None
        if "json" in answer.content_type or data[:1] in (b"{", b"["):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if "json" in answer.content_type:
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
        From a hub task the whole stream is read first, then replayed (streaming callers
        run on worker threads)."""
        if current_task() is not None:
            events: list[SSEEvent] = run_async(
                lambda: self._stream(method, path, body, timeout, headers, None)
            )
            yield from events
            return
        pipe: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        cancel = spawn_async(
            lambda: self._stream(method, path, body, timeout, headers, pipe.put),
            lambda value, error: pipe.put((True, error)),
        )
        try:
            while True:
                ended, value = pipe.get()
                if ended:
                    if value is not None:
                        raise value
                    return
                yield value
        finally:
            cancel()

    async def _stream(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Any,
        headers: Mapping[str, str] | None,
        emit: Callable[[tuple[bool, Any]], None] | None,
    ) -> list[SSEEvent]:
        """Read the stream's events: each to ``emit`` as it comes, else all returned."""
        import aiohttp

        hdrs = {"Accept": "text/event-stream", **dict(headers or {})}
        answer, endpoint = await self._send(method, path, body, timeout, hdrs, stream=True)
        response = answer.response
        url = endpoint.url + path
        collected: list[SSEEvent] = []
        parser = SSEParser()
        try:
            async for raw in response.content:
                event = parser.feed(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
                if event is SSEParser.DONE:
                    break
                if event is None:
                    continue
                raise_stream_error(event, url, self.redact)
                if emit is not None:
                    emit((False, event))
                else:
                    collected.append(event)
            else:
                event = parser.finish()
                if event is not None and event is not SSEParser.DONE:
                    raise_stream_error(event, url, self.redact)
                    if emit is not None:
                        emit((False, event))
                    else:
                        collected.append(event)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._count(failures=1)
            raise TransportError(
                self.redact(f"{method} {url}: the stream broke: {type(exc).__name__}: {exc}")
            ) from None
        finally:
            response.release()
            self.pool.release(endpoint, failed=False)
        return collected

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Any,
        headers: Mapping[str, str] | None,
        *,
        stream: bool,
    ) -> tuple[_Answer, Any]:
        hdrs = dict(self._headers)
        if isinstance(body, bytes):
            payload: bytes | None = body
        else:
            payload = orjson.dumps(body) if body is not None else None
            if payload is not None:
                hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        limits = Timeout.of(timeout) if timeout is not None else self.timeout
        session = await self._client()
        started = time.monotonic()
        attempt = 0
        while True:
            endpoint = self.pool.acquire()
            url = endpoint.url + path
            sent = hdrs
            if endpoint.authorization and not any(k.lower() == "authorization" for k in hdrs):
                sent = {**hdrs, "Authorization": endpoint.authorization}
            self._count(requests=1)
            try:
                answer = await self._attempt(session, method, url, payload, sent, limits, stream)
            except _Failure as failure:
                self.pool.release(endpoint, failed=failure.endpoint_failed)
                # A server's Retry-After is honoured as given; one of (almost) zero would let
                # every retry go at once, so our own backoff applies to it instead.
                delay = failure.wait if failure.wait and failure.wait >= 0.05 else None
                if delay is None:  # "equal jitter": never less than half the backoff
                    base = min(self.max_backoff, self.backoff * 2**attempt)
                    delay = random.uniform(base / 2, base)
                elapsed = time.monotonic() - started
                over_budget = elapsed + delay > self.retry_time
                if not failure.retryable or attempt >= self.retries or over_budget:
                    self._count(failures=1)
                    error = failure.error
                    if failure.retryable and attempt < self.retries and failure.wait:
                        error = _explained(error, failure.wait, self.retry_time)
                    raise error from None
                attempt += 1
                self._count(retries=1)
                logger.info(
                    "retry %d/%d of %s %s in %.2f s: %s",
                    attempt, self.retries, method, url, delay, failure.error,
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            if not stream:
                self.pool.release(endpoint, failed=False)
            return answer, endpoint

    async def _attempt(
        self,
        session: Any,
        method: str,
        url: str,
        payload: bytes | None,
        headers: dict[str, str],
        limits: Timeout,
        stream: bool,
    ) -> _Answer:
        import aiohttp

        deadline = aiohttp.ClientTimeout(
            total=None if stream else limits.total,
            connect=limits.connect_timeout,
            sock_read=limits.read_timeout,
        )
        response = None
        try:
            response = await session.request(
                method, url, data=payload, headers=headers, timeout=deadline,
                allow_redirects=False,
            )  # fmt: skip
            status = response.status
            content_type = response.headers.get("Content-Type", "")
            if status < 400:
                if stream:
                    return _Answer(content_type, b"", response)
                return _Answer(content_type, await self._read(response, url, method))
            body = await self._read(response, url, method, limit=_ERROR_BODY_BYTES, cut=True)
        except _Failure:
            raise
        except Exception as exc:
            raise self._failure(exc, method, url, limits) from None
        finally:
            if response is not None and not stream:
                response.release()
        if stream:
            response.release()
        error = ServerError(status, self.redact(error_message(body)), url)
        retryable = status in RETRY_STATUSES or status >= 500
        wait = retry_after_seconds(response.headers.get("Retry-After")) if retryable else None
        raise _Failure(error, retryable, endpoint_failed=status >= 500, wait=wait)

    async def _read(
        self, response: Any, url: str, method: str, *, limit: int | None = None, cut: bool = False
    ) -> bytes:
        """The whole body, refused past ``limit`` bytes (or cut there, for error bodies)."""
        limit = self.max_response_bytes if limit is None else limit
        length = response.content_length
        if length is not None and length <= limit:
            return await response.read()  # type: ignore[no-any-return]
        if length is not None and not cut:
            raise self._too_large(method, url, limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                if cut:
                    chunks.append(chunk[: max(0, limit - (size - len(chunk)))])
                    break
                raise self._too_large(method, url, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, method: str, url: str, limit: int) -> _Failure:
        error = TransportError(
            f"{method} {url}: the answer is larger than {limit / 1024 / 1024:.0f} MB "
            "(max_response_bytes); not read"
        )
        return _Failure(error, retryable=False, endpoint_failed=False)

    def _failure(self, exc: BaseException, method: str, url: str, limits: Timeout) -> _Failure:
        """An attempt that got no usable answer, as the retry loop sees it."""
        import aiohttp

        name = type(exc).__name__
        if isinstance(exc, aiohttp.ClientSSLError):
            error = TransportError(self.redact(f"{method} {url}: TLS error: {exc}"))
            return _Failure(error, retryable=False, endpoint_failed=True)
        connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", ())
        if isinstance(exc, connect_timeout):
            error = TransportError(
                f"{method} {url}: connection failed: no connection within "
                f"{limits.connect_timeout:g} s"
            )
            return _Failure(error, retryable=True, endpoint_failed=True)
        if isinstance(exc, asyncio.TimeoutError):
            read_timeout = isinstance(exc, getattr(aiohttp, "SocketTimeoutError", ()))
            why = (
                f"no answer within {limits.read_timeout:g} s (read timeout)"
                if read_timeout
                else f"no complete answer within {limits.total:g} s (read timeout: the "
                "request's deadline passed)"
            )
            error = TransportError(f"{method} {url}: {why}", timed_out=True)
            return _Failure(error, self.retry_read_timeouts, endpoint_failed=False)
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            reason = getattr(exc, "os_error", None) or exc
            error = TransportError(
                self.redact(f"{method} {url}: connection failed: {name}: {reason}")
            )
            return _Failure(error, retryable=True, endpoint_failed=True)
        raise exc


def _explained(error: Exception, wait: float, budget: float) -> Exception:
    """A refusal whose ``Retry-After`` lies beyond the retry budget says so."""
    if isinstance(error, ServerError):
        note = (
            f"{error.server_message} (the server asked to wait {wait:.0f} s before retrying, "
            f"longer than the retry budget of {budget:.0f} s)"
        )
        return ServerError(error.status, note, error.url)
    return error
