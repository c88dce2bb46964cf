"""A loopback server that speaks SGLang's native API and misbehaves on purpose.

It answers ``GET /get_model_info``, ``GET /get_server_info``, ``GET /health``,
``POST /flush_cache`` and ``POST /generate`` (plain, streamed and list requests, with
``input_token_logprobs`` triples for ``return_logprob`` so ``select`` works) with deterministic
fake generations, and injects the faults of a ``Faults`` configuration into ``/generate``:

* ``error_rate``       HTTP 500 or 503 with a JSON error body;
* ``rate_limit_rate``  HTTP 429 with ``Retry-After: <retry_after>``;
* ``reset_rate``       the connection is reset (RST) before any response byte;
* ``cut_rate``         the response is cut off half-way (a streamed one after half its events,
                       a plain one after half its declared Content-Length), then reset;
* ``hang_rate``        no answer for ``hang_seconds`` (past the client's read timeout);
* ``bad_json_rate``    HTTP 200 whose body is not JSON;
* ``disappear_after``  after that many ``/generate`` requests the server stops listening (and
                       drops open connections) for ``disappear_seconds``, then binds the same
                       port again;
* ``fail_rows``        rows whose every ``/generate`` request answers HTTP 500 (a permanent
                       failure, for exit-code tests);
* ``echo_headers``     error bodies (and 404s) quote the request's headers, Authorization
                       included, as careless proxies do: bait for secret leaks.

Which fault (if any) a request gets is drawn from an RNG seeded with ``seed``, the request body
and how many times that exact body was seen before, so a run is reproducible whatever the
client's thread interleaving. Every ``/generate`` request is logged with the row it belongs to
(``row=<key>`` found in the prompt), the outcome and the time, so tests can count requests per
row and check that a finished row is never sent again.

The server runs in daemon threads, binds 127.0.0.1 only and stops by itself after
``max_lifetime`` seconds. It can also run as a script (``python faulty_server.py --port 0
--faults '{"error_rate": 0.1}'``), printing ``PORT <n>`` when it listens.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import re
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Faults", "FaultyServer", "RequestLog", "fake_tokens"]

ROW_PATTERN = re.compile(r"\brow=([A-Za-z0-9_.-]+)")
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
_TOKEN = re.compile(r"\s*\S+|\s+")


@dataclasses.dataclass
class Faults:
    """What goes wrong, and how often (fractions of ``/generate`` requests)."""

    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 503)
    rate_limit_rate: float = 0.0
    retry_after: str = "1"
    reset_rate: float = 0.0
    cut_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 5.0
    bad_json_rate: float = 0.0
    disappear_after: int | None = None
    disappear_seconds: float = 5.0
    fail_rows: frozenset[str] = frozenset()
    delay: float = 0.0  # latency of every /generate answer, faults included
    echo_headers: bool = False  # error bodies quote the request headers (leak bait)

    def ranges(self) -> list[tuple[str, float]]:
        return [
            ("error", self.error_rate),
            ("rate_limit", self.rate_limit_rate),
            ("reset", self.reset_rate),
            ("cut", self.cut_rate),
            ("hang", self.hang_rate),
            ("bad_json", self.bad_json_rate),
        ]

    @classmethod
    def from_json(cls, text: str) -> Faults:
        data = json.loads(text) if text else {}
        if "fail_rows" in data:
            data["fail_rows"] = frozenset(data["fail_rows"])
        if "error_statuses" in data:
            data["error_statuses"] = tuple(data["error_statuses"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class RequestLog:
    """One ``/generate`` request as the server saw it."""

    seq: int
    time: float
    row: str | None  # the first row in the request
    rows: tuple[str, ...]  # every row in it: a list request (coalesced) carries many
    kind: str  # "gen", "stream", "prefix" (max_new_tokens=0) or "select" (list + logprobs)
    attempt: int  # how many times this exact body was seen before
    digest: str
    outcome: str  # "ok", "error", "rate_limit", "reset", "cut", "hang", "bad_json", "down"
    status: int | None


def fake_tokens(text: str) -> list[str]:
    """The fake tokenizer: words with their leading whitespace (and trailing blanks alone)."""
    return _TOKEN.findall(text)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _fake_logprob(token: str) -> float:
    value = int(hashlib.md5(token.encode("utf-8", "surrogatepass")).hexdigest()[:6], 16)
    return -((value % 4000) / 1000.0) - 0.01


def _fake_completion(prompt: str, max_new_tokens: int, stops: Iterable[str]) -> tuple[str, dict]:
    """Deterministic text for ``prompt``: up to 3 words, cut at the first stop string."""
    seed = int(hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
    count = min(max_new_tokens, 3)
    words = [_WORDS[(seed >> (5 * i)) % len(_WORDS)] for i in range(count)]
    text = "".join(" " + w for w in words)
    matched = None
    for stop in stops:
        position = text.find(stop) if stop else -1
        if position >= 0:
            text, matched = text[:position], stop
            break
    if matched is not None:
        finish: dict[str, Any] = {"type": "stop", "matched": matched}
    elif count >= max_new_tokens:
        finish = {"type": "length", "length": max_new_tokens}
    else:
        finish = {"type": "stop", "matched": 2}
    return text, finish


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], owner: FaultyServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        owner = self.owner
        raw = request
        owner._track(raw, add=True)
        try:
            if owner.tls_context is not None:
                try:
                    request.settimeout(10)
                    request = owner.tls_context.wrap_socket(request, server_side=True)
                    request.settimeout(None)
                except (OSError, ssl.SSLError):
                    owner.tls_failures += 1
                    return
                owner._track(request, add=True)
            super().finish_request(request, client_address)
        finally:
            owner._track(raw, add=False)
            owner._track(request, add=False)
            if owner.tls_context is not None:
                try:
                    request.close()
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # faults make clients drop connections; nothing worth printing


class _Reset(Exception):
    """Raised by a handler after it reset the connection on purpose."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no 40 ms ACK stalls
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # --------------------------------------------------------------- plumbing
    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Reset:
            self.close_connection = True
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        if status >= 400 and self.server.owner.faults.echo_headers:
            error = value.get("error", {}) if isinstance(value, dict) else {}
            sent = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
            error["message"] = f"{error.get('message', '')} (request headers: {sent})"
        self._send(status, json.dumps(value).encode(), headers)

    def _reset(self) -> None:
        """Close the socket with SO_LINGER 0: the client sees a connection reset."""
        try:
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass
        raise _Reset

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # --------------------------------------------------------------- routes
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server.owner
        owner.other_requests[self.path] += 1
        owner.headers_seen.append(dict(self.headers.items()))
        if self.path.startswith("/get_model_info"):
            self._json(200, owner.model_info())
        elif self.path.startswith("/get_server_info"):
            self._json(200, {"model_path": owner.model_path, "version": "faulty-0"})
        elif self.path.startswith("/health"):
            self._send(200, b"")
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server.owner
        body = self._read_body()
        owner.headers_seen.append(dict(self.headers.items()))
        if self.path.startswith("/flush_cache"):
            owner.other_requests[self.path] += 1
            self._send(200, b"Cache flushed.")
            return
        if not self.path.startswith("/generate"):
            owner.other_requests[self.path] += 1
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or "text" not in data:
                raise ValueError("expected an object with 'text'")
        except ValueError as exc:
            owner.other_requests["bad-request"] += 1
            self._json(400, {"error": {"message": f"bad request: {exc}"}})
            return
        entry = owner._admit(body, data)
        if owner.faults.delay:
            owner._stopped.wait(owner.faults.delay)
        self._answer(entry, data)

    def _answer(self, entry: RequestLog, data: dict[str, Any]) -> None:
        owner = self.server.owner
        outcome = entry.outcome
        if outcome == "down":
            self._reset()
        if outcome == "error":
            status = entry.status or 500
            self._json(status, {"error": {"message": f"injected fault: HTTP {status}"}})
            return
        if outcome == "rate_limit":
            self._json(
                429,
                {"error": {"message": "injected fault: too many requests"}},
                {"Retry-After": owner.faults.retry_after},
            )
            return
        if outcome == "reset":
            self._reset()
        if outcome == "hang":
            owner._stopped.wait(owner.faults.hang_seconds)
            self._reset()
        if outcome == "bad_json":
            self._send(200, b"<html><body>502 Bad Gateway (not JSON)</body></html>")
            return
        if data.get("stream"):
            self._stream(data, cut=outcome == "cut")
            return
        reply = json.dumps(owner.respond(data)).encode()
        if outcome == "cut":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply[: len(reply) // 2])
            self.wfile.flush()
            time.sleep(0.02)
            self._reset()
        self._send(200, reply)

    def _stream(self, data: dict[str, Any], *, cut: bool) -> None:
        owner = self.server.owner
        final = owner.respond(data)
        text = final["text"]
        pieces = fake_tokens(text) or [""]
        events = []
        so_far = ""
        for index, piece in enumerate(pieces):
            so_far += piece
            meta = dict(final["meta_info"])
            meta["completion_tokens"] = index + 1
            if index < len(pieces) - 1:
                meta["finish_reason"] = None
            events.append(json.dumps({"text": so_far, "meta_info": meta}))
        events.append("[DONE]")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        limit = max(1, len(events) // 2) if cut else len(events)
        for event in events[:limit]:
            payload = f"data: {event}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()
        if cut:
            time.sleep(0.02)
            self._reset()
        self.wfile.write(b"0\r\n\r\n")


class FaultyServer:
    """The server; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        seed: int = 0,
        port: int = 0,
        max_lifetime: float = 300.0,
        tls: tuple[str, str] | None = None,
        model_path: str = "faulty/fake-model",
    ) -> None:
        self.faults = faults or Faults()
        self.seed = seed
        self.port = port
        self.max_lifetime = max_lifetime
        self.model_path = model_path
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])
            self.tls_context = context
        self.tls_failures = 0
        self.log: list[RequestLog] = []
        self.other_requests: Counter[str] = Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.downtimes: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self._generate_count = 0
        self._stopped = threading.Event()
        self._down = threading.Event()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._connections: set[Any] = set()
        self._conn_lock = threading.Lock()
        self._lifetime_timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def scheme(self) -> str:
        return "https" if self.tls_context is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> FaultyServer:
        self._bind()
        self._lifetime_timer = threading.Timer(self.max_lifetime, self.stop)
        self._lifetime_timer.daemon = True
        self._lifetime_timer.start()
        return self

    def _bind(self, attempts: int = 50) -> None:
        error: OSError | None = None
        for _ in range(attempts):
            try:
                server = _Server(("127.0.0.1", self.port), self)
                break
            except OSError as exc:  # the old socket may linger a moment after a disappearance
                error = exc
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot bind 127.0.0.1:{self.port}: {error}")
        self.port = server.server_address[1]
        self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._serve_thread.start()

    def _unbind(self) -> None:
        server = self._server
        self._server = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopped.set()
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
        self._unbind()

    def __enter__(self) -> FaultyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: Any, *, add: bool) -> None:
        with self._conn_lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _disappear(self) -> None:
        start = time.monotonic()
        self._down.set()
        try:
            self._unbind()
            self._stopped.wait(self.faults.disappear_seconds)
            if not self._stopped.is_set():
                self._bind()
        finally:
            self.downtimes.append((start, time.monotonic()))
            self._down.clear()

    # ------------------------------------------------------------------ behaviour
    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
        }

    def _admit(self, body: bytes, data: dict[str, Any]) -> RequestLog:
        """Log the request and decide its fate."""
        text = data.get("text")
        texts = text if isinstance(text, list) else [text]
        found = [ROW_PATTERN.search(t if isinstance(t, str) else "") for t in texts]
        rows = tuple(dict.fromkeys(m.group(1) for m in found if m))
        row = rows[0] if rows else None
        params = data.get("sampling_params") or {}
        if isinstance(params, list):  # SGLang's per-item form: classify by the first item
            params = params[0] if params else {}
        logprob = data.get("return_logprob")
        if isinstance(logprob, list):
            logprob = all(logprob)
        if logprob:
            kind = "select"
        elif params.get("max_new_tokens") == 0:
            kind = "prefix"
        else:
            kind = "stream" if data.get("stream") else "gen"
        digest = _digest(body)
        faults = self.faults
        disappear = False
        with self._lock:
            attempt = self._seen[digest]
            self._seen[digest] += 1
            self._generate_count += 1
            if (
                faults.disappear_after is not None
                and self._generate_count == faults.disappear_after
            ):
                disappear = True
            rng = random.Random(f"{self.seed}|{digest}|{attempt}")
            draw = rng.random()
            outcome, status = "ok", 200
            if self._down.is_set() or disappear:
                outcome, status = "down", None
            elif any(r in faults.fail_rows for r in rows):
                outcome, status = "error", 500
            else:
                edge = 0.0
                for name, rate in faults.ranges():
                    edge += rate
                    if draw < edge:
                        outcome = name
                        break
                if outcome == "error":
                    status = rng.choice(faults.error_statuses)
                elif outcome == "rate_limit":
                    status = 429
                elif outcome in ("reset", "hang", "cut"):
                    status = None
            entry = RequestLog(
                seq=len(self.log),
                time=time.monotonic(),
                row=row,
                rows=rows,
                kind=kind,
                attempt=attempt,
                digest=digest,
                outcome=outcome,
                status=status,
            )
            self.log.append(entry)
        if disappear:
            threading.Thread(target=self._disappear, daemon=True).start()
        return entry

    def respond(self, data: dict[str, Any]) -> Any:
        text = data["text"]
        if isinstance(text, list):
            return [self._respond_one(item_options(data, i)) for i in range(len(text))]
        return self._respond_one(data)

    def _respond_one(self, data: dict[str, Any]) -> dict[str, Any]:
        prompt = str(data["text"])
        params = data.get("sampling_params") or {}
        max_new = params.get("max_new_tokens")
        max_new = 16 if max_new is None else int(max_new)
        stops = params.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        tokens = fake_tokens(prompt)
        if max_new == 0:
            text, finish = "", {"type": "length", "length": 0}
        else:
            text, finish = _fake_completion(prompt, max_new, stops)
        meta: dict[str, Any] = {
            "id": _digest(prompt.encode("utf-8", "surrogatepass")),
            "prompt_tokens": len(tokens),
            "completion_tokens": len(fake_tokens(text)),
            "cached_tokens": 0,
            "finish_reason": finish,
            "e2e_latency": 0.001,
        }
        if data.get("return_logprob"):
            start = int(data.get("logprob_start_len") or 0)
            triples = []
            for position in range(start, len(tokens)):
                token = tokens[position]
                logprob = None if position == 0 else _fake_logprob(token)
                triples.append([logprob, position, token])
            meta["input_token_logprobs"] = triples
            meta["output_token_logprobs"] = []
            values = [t[0] for t in triples if t[0] is not None]
            meta["normalized_prompt_logprob"] = sum(values) / len(values) if values else 0.0
        return {"text": text, "meta_info": meta}

    # ------------------------------------------------------------------ for tests
    def mark(self) -> int:
        """A position in the log; ``since(mark)`` returns the requests after it."""
        with self._lock:
            return len(self.log)

    def since(self, mark: int = 0) -> list[RequestLog]:
        with self._lock:
            return list(self.log[mark:])

    def requests_per_row(self, mark: int = 0) -> Counter[str]:
        return Counter(row for entry in self.since(mark) for row in entry.rows)

    def outcomes(self, mark: int = 0) -> Counter[str]:
        return Counter(entry.outcome for entry in self.since(mark))

    def faults_injected(self, mark: int = 0) -> int:
        return sum(1 for entry in self.since(mark) if entry.outcome != "ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default="{}", help="Faults fields as a JSON object")
    parser.add_argument("--max-lifetime", type=float, default=300.0)
    args = parser.parse_args(argv)
    server = FaultyServer(
        Faults.from_json(args.faults),
        seed=args.seed,
        port=args.port,
        max_lifetime=args.max_lifetime,
    ).start()
    print(f"PORT {server.port}", flush=True)
    try:
        server._stopped.wait(args.max_lifetime + 1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def item_options(data: dict[str, Any], index: int) -> dict[str, Any]:
    """Item ``index`` of a list request, its per-item options (SGLang accepts each as one
    value for all items or a list with one value per item) made single."""
    item = dict(data, text=data["text"][index])
    for key in ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num"):
        value = data.get(key)
        if isinstance(value, list):
            item[key] = value[index]
    return item
