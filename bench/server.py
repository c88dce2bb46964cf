"""An instant loopback model server for the benchmarks.

It answers SGLang's native API (``/generate``, ``/get_model_info``, ``/server_info``,
``/flush_cache``, ...) and the OpenAI API (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``) at once, with fixed replies and no model, so what a benchmark measures is the
client: the language runtime and its HTTP transport.

It is a bare asyncio protocol (HTTP/1.1 keep-alive, ``Content-Length`` bodies) with orjson, in its
own process so it never competes with the client for the GIL. ``--delay-ms`` holds every answer
that long (a model's latency) without blocking other connections. ``--latency-median-ms`` with
``--latency-sigma`` instead draws each ``/generate`` item's latency from a seeded lognormal (real
models answer in very different times); a list request answers when its slowest item would,
as a batching server does. The server keeps every drawn latency and the time-weighted number of
items in flight, so a benchmark can compare a client against what the server made possible.

    python -m bench.server [--host 127.0.0.1] [--port 0] [--delay-ms 0]
                           [--latency-median-ms 0 --latency-sigma 1.0 --seed 0]

It prints ``PORT <n>`` on the first line of stdout once it listens (port 0 picks a free one),
counts requests (``GET /bench/stats``, ``POST /bench/reset``) and prints the counts on exit
(SIGINT/SIGTERM or end of stdin when ``--exit-on-eof``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import orjson

MODEL = "bench-model"
REPLY = " bench answer"
CHARS_PER_TOKEN = 4
MAX_LOGPROB_TOKENS = 4096

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
}


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.generate_items = 0
        self.connections = 0
        self.reads = 0  # data_received calls: network reads the requests took
        self.errors: collections.Counter[str] = collections.Counter()  # status -> count
        self.by_path: collections.Counter[str] = collections.Counter()
        self.draws: list[float] = []  # drawn per-item latencies (seconds), in arrival order
        self.in_flight = 0  # generation items received and not yet answered
        self.requests_in_flight = 0  # generation requests (a list counts once)
        self.max_in_flight = 0
        self._area = 0.0  # integral of in_flight over time
        self._request_area = 0.0
        self._since: float | None = None  # the first generation request after a reset
        self._last = time.monotonic()

    def flight(self, delta: int) -> None:
        """``delta`` items (of one request) arrive (> 0) or are answered (< 0)."""
        now = time.monotonic()
        if self._since is None:
            self._since = self._last = now
        self._area += self.in_flight * (now - self._last)
        self._request_area += self.requests_in_flight * (now - self._last)
        self._last = now
        self.in_flight += delta
        self.requests_in_flight += (delta > 0) - (delta < 0)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def as_dict(self) -> dict[str, Any]:
        """The counters; in-flight averages span the first request to the last answer."""
        span = self._last - self._since if self._since is not None else 0.0
        return {
            "requests": self.requests,
            "generate_items": self.generate_items,
            "connections": self.connections,
            "reads": self.reads,
            "errors": dict(self.errors),
            "by_path": dict(self.by_path),
            "draws": list(self.draws),
            "in_flight_avg": self._area / span if span > 0 else 0.0,
            "requests_in_flight_avg": self._request_area / span if span > 0 else 0.0,
            "in_flight_max": self.max_in_flight,
            "span_s": span,
        }

    def reset(self) -> None:
        self.__init__()


STATS = Stats()


class Latency:
    """Per-item answer latency: fixed (``--delay-ms``) or drawn from a seeded lognormal."""

    fixed = 0.0
    median = 0.0
    sigma = 0.0
    rng = random.Random(0)

    @classmethod
    def for_items(cls, count: int) -> float:
        """Seconds until an answer of ``count`` items may leave: its slowest item's."""
        if cls.median <= 0:
            return cls.fixed
        mu = math.log(cls.median)
        draws = [cls.rng.lognormvariate(mu, cls.sigma) for _ in range(max(1, count))]
        STATS.draws.extend(draws)
        return max(draws)


# --------------------------------------------------------------------------- fake model
def n_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def _logprob(position: int, piece: str) -> float:
    # Deterministic and cheap; differs between choices so select has something to compare.
    return -0.05 - ((position * 7 + len(piece) * 13 + (ord(piece[0]) if piece else 0)) % 17) / 8


def token_logprobs(text: str, start: int, with_text: bool) -> list[list[Any]]:
    """``[[logprob, token_id, text|None], ...]`` for the fake tokens of ``text`` from ``start``."""
    total = n_tokens(text)
    start = max(0, min(start, total - 1))
    stop = min(total, start + MAX_LOGPROB_TOKENS)
    out: list[list[Any]] = []
    for position in range(start, stop):
        piece = text[position * CHARS_PER_TOKEN : (position + 1) * CHARS_PER_TOKEN]
        out.append([_logprob(position, piece), position, piece if with_text else None])
    if out and start == 0:
        out[0][0] = None  # like SGLang, the first prompt token has no logprob
    return out


def _first_stop(stop: Any) -> str | None:
    if isinstance(stop, str):
        return stop or None
    if isinstance(stop, list) and stop and isinstance(stop[0], str):
        return stop[0]
    return None


def complete(prompt: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The generated text and finish reason for one prompt."""
    max_new = params.get("max_new_tokens", params.get("max_tokens", 128))
    if max_new is None:
        max_new = 128
    if max_new <= 0:
        return "", {"type": "length", "length": 0}
    text = REPLY
    limit = max_new * CHARS_PER_TOKEN
    if len(text) > limit:
        return text[:limit], {"type": "length", "length": max_new}
    stop = _first_stop(params.get("stop"))
    if stop is not None:
        return text, {"type": "stop", "matched": stop}
    return text, {"type": "stop", "matched": None}


def generate_one(prompt: str, body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("sampling_params") or {}
    text, finish = complete(prompt, params)
    prompt_tokens = n_tokens(prompt)
    completion_tokens = n_tokens(text) if text else 0
    meta: dict[str, Any] = {
        "id": "bench",
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": 0,
        "finish_reason": finish,
    }
    if body.get("return_logprob"):
        with_text = bool(body.get("return_text_in_logprobs"))
        start = body.get("logprob_start_len")
        start = prompt_tokens - 1 if start is None or start < 0 else start
        inputs = token_logprobs(prompt, start, with_text)
        values = [item[0] for item in inputs if item[0] is not None]
        meta["input_token_logprobs"] = inputs
        meta["output_token_logprobs"] = token_logprobs(text, 0, with_text) if text else []
        if meta["output_token_logprobs"]:
            meta["output_token_logprobs"][0][0] = -0.1
        meta["normalized_prompt_logprob"] = sum(values) / len(values) if values else 0.0
        top = body.get("top_logprobs_num") or 0
        if top:
            meta["input_top_logprobs"] = [None for _ in inputs]
            meta["output_top_logprobs"] = [
                [[item[0], item[1], item[2]]] for item in meta["output_token_logprobs"]
            ]
    return {"text": text, "meta_info": meta}


def item_options(body: dict[str, Any], index: int) -> dict[str, Any]:
    """Item ``index`` of a list request: SGLang takes per-item options as one value for all
    items or as a list with one value per item."""
    item = body
    for key in ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num"):
        value = body.get(key)
        if isinstance(value, list):
            if item is body:
                item = dict(body)
            item[key] = value[index]
    return item


def sse(chunks: list[Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def generate_items(body: dict[str, Any]) -> int:
    text = body.get("text")
    if text is None:
        ids = body.get("input_ids")
        return len(ids) if ids and isinstance(ids[0], list) else 1
    return len(text) if isinstance(text, list) else 1


def handle_generate(body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    text = body.get("text")
    if text is None and body.get("input_ids") is not None:
        ids = body["input_ids"]
        text = [" " * len(x) for x in ids] if ids and isinstance(ids[0], list) else " " * len(ids)
    if text is None:
        return 400, b"application/json", orjson.dumps({"error": "text or input_ids required"})
    if isinstance(text, list):
        STATS.generate_items += len(text)
        result: Any = [generate_one(t, item_options(body, i)) for i, t in enumerate(text)]
    else:
        STATS.generate_items += 1
        result = generate_one(text, body)
    if body.get("stream") and not isinstance(result, list):
        # SGLang streams cumulative text; the body is sent at once (the server is instant).
        full = result["text"]
        half = {"text": full[: len(full) // 2], "meta_info": {**result["meta_info"]}}
        half["meta_info"]["finish_reason"] = None
        chunks = [half, result] if full else [result]
        return 200, b"text/event-stream", sse(chunks)
    return 200, b"application/json", orjson.dumps(result)


def _usage(prompt: str, text: str) -> dict[str, int]:
    p, c = n_tokens(prompt), n_tokens(text) if text else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def handle_completions(body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    prompt = body.get("prompt", "")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    choices, usage_prompt = [], ""
    for index, item in enumerate(prompts):
        item = item if isinstance(item, str) else " " * len(item)
        text, finish = complete(item, body)
        if body.get("echo"):
            text = item + text
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish["type"],
                "matched_stop": finish.get("matched"),
            }
        )
        usage_prompt += item
    created = int(time.time())
    base = {"id": "cmpl-bench", "created": created, "model": body.get("model") or MODEL}
    if body.get("stream"):
        chunks = [
            {**base, "object": "text_completion", "choices": [{**c, "finish_reason": None}]}
            for c in choices
        ]
        chunks.append({**base, "object": "text_completion", "choices": choices})
        return 200, b"text/event-stream", sse(chunks)
    out = {
        **base,
        "object": "text_completion",
        "choices": choices,
        "usage": _usage(usage_prompt, "".join(c["text"] for c in choices)),
    }
    return 200, b"application/json", orjson.dumps(out)


def handle_chat(body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    messages = body.get("messages") or []
    prompt = "".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    params = {"max_tokens": body.get("max_completion_tokens", body.get("max_tokens")), **body}
    if params.get("max_tokens") is None:
        params["max_tokens"] = 128
    text, finish = complete(prompt, params)
    created = int(time.time())
    base = {"id": "chatcmpl-bench", "created": created, "model": body.get("model") or MODEL}
    if body.get("stream"):
        chunks = [
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                             "finish_reason": None}],
            },
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish["type"]}],
            },
        ]  # fmt: skip
        return 200, b"text/event-stream", sse(chunks)
    out = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish["type"],
                "logprobs": None,
            }
        ],
        "usage": _usage(prompt, text),
    }
    return 200, b"application/json", orjson.dumps(out)


def model_info() -> dict[str, Any]:
    return {
        "model_path": MODEL,
        "tokenizer_path": MODEL,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
    }


def server_info() -> dict[str, Any]:
    return {
        "model_path": MODEL,
        "version": "bench",
        "internal_states": [{"avg_spec_accept_length": None}],
        "bench_stats": STATS.as_dict(),
    }


ITEMS = [0]  # generation items of the request ``route`` just answered (0: not a generation)


def route(method: bytes, path: str, body: bytes) -> tuple[int, bytes, bytes]:
    path = path.split("?", 1)[0]
    ITEMS[0] = 0
    STATS.requests += 1
    STATS.by_path[path] += 1
    if method == b"POST" and path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return 400, b"application/json", b'{"error": "invalid JSON"}'
        if not isinstance(data, dict):
            return 400, b"application/json", b'{"error": "expected a JSON object"}'
        if path == "/generate":
            ITEMS[0] = generate_items(data)
            return handle_generate(data)
        ITEMS[0] = 1
        if path == "/v1/completions":
            return handle_completions(data)
        return handle_chat(data)
    if path in ("/get_model_info", "/model_info"):
        return 200, b"application/json", orjson.dumps(model_info())
    if path in ("/server_info", "/get_server_info"):
        return 200, b"application/json", orjson.dumps(server_info())
    if path == "/flush_cache":
        return 200, b"text/plain", b"Cache flushed.\n"
    if path in ("/health", "/health_generate"):
        return 200, b"text/plain", b""
    if path == "/v1/models":
        data = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
        return 200, b"application/json", orjson.dumps(data)
    if path == "/bench/stats":
        return 200, b"application/json", orjson.dumps(STATS.as_dict())
    if path == "/bench/reset":
        STATS.reset()
        return 200, b"application/json", b"{}"
    if path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        return 405, b"application/json", b'{"error": "use POST"}'
    return 404, b"application/json", b'{"error": "not found"}'


# --------------------------------------------------------------------------- HTTP/1.1
MAX_BODY = 256 * 1024 * 1024


def response_bytes(status: int, content_type: bytes, payload: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        _REASONS.get(status, b"OK"),
        content_type,
        len(payload),
        b"" if keep_alive else b"Connection: close\r\n",
    )
    return head + payload


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining (answers leave in request order)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[list[Any]] = collections.deque()  # [ready, bytes, close]
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        STATS.reads += 1
        self.buffer += data
        while not self.closing:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self._fail(400)
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._fail(400)
                return
            length = 0
            keep_alive = version == "HTTP/1.1"
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        self._fail(400)
                        return
                elif name == "connection":
                    token = value.strip().lower()
                    if token == "close":
                        keep_alive = False
                    elif token == "keep-alive":
                        keep_alive = True
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if length > MAX_BODY:
                self._fail(413)
                return
            start = end + 4
            if chunked:
                parsed = _dechunk(self.buffer, start)
                if parsed is None:
                    return
                body, consumed = parsed
            else:
                if len(self.buffer) < start + length:
                    return
                body = bytes(self.buffer[start : start + length])
                consumed = start + length
            del self.buffer[:consumed]
            try:
                status, ctype, payload = route(method.encode(), target, body)
            except Exception as exc:  # never let one bad request kill the server
                status, ctype = 400, b"application/json"
                payload = orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})
            if status >= 400:
                STATS.errors[str(status)] += 1
            items = ITEMS[0] if status < 400 else 0
            delay = Latency.for_items(items) if items else Latency.fixed
            self._respond(
                response_bytes(status, ctype, payload, keep_alive), not keep_alive, delay, items
            )
            if not keep_alive:
                self.closing = True

    def _fail(self, status: int) -> None:
        self.closing = True
        self._respond(response_bytes(status, b"text/plain", b"", False), True, 0.0, 0)

    def _respond(self, data: bytes, close: bool, delay: float, items: int) -> None:
        if items:
            STATS.flight(items)
        if delay <= 0 and not self.pending:
            self._write(data, close, items)
            return
        entry = [False, data, close, items]
        self.pending.append(entry)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._ready, entry)
        else:
            self._ready(entry)

    def _ready(self, entry: list[Any]) -> None:
        entry[0] = True
        while self.pending and self.pending[0][0]:
            _, data, close, items = self.pending.popleft()
            self._write(data, close, items)

    def _write(self, data: bytes, close: bool, items: int = 0) -> None:
        if items:
            STATS.flight(-items)
        if self.transport is None:
            return
        self.transport.write(data)
        if close:
            self.transport.close()


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    body = bytearray()
    pos = start
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buffer[pos:line_end]).split(b";")[0].strip() or b"0", 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", pos)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 2
        if len(buffer) < pos + size + 2:
            return None
        body += buffer[pos : pos + size]
        pos += size + 2


async def serve(host: str, port: int, delay_ms: float, exit_on_eof: bool) -> None:
    Latency.fixed = delay_ms / 1000.0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    if exit_on_eof:
        import threading

        threading.Thread(target=_wait_eof, args=(loop, stop), daemon=True).start()
    async with server:
        await stop
    try:
        sys.stdout.write("STATS " + orjson.dumps(STATS.as_dict()).decode() + "\n")
        sys.stdout.flush()
    except OSError:  # the parent is gone
        pass


def _wait_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Future[None]) -> None:
    try:
        sys.stdin.read()
    except Exception:
        pass
    loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency of every answer")
    parser.add_argument("--exit-on-eof", action="store_true", help="stop when stdin closes")
    parser.add_argument(
        "--latency-median-ms", type=float, default=0.0,
        help="draw each generation item's latency from a lognormal with this median",
    )  # fmt: skip
    parser.add_argument("--latency-sigma", type=float, default=1.0, help="the lognormal's sigma")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latency draws")
    args = parser.parse_args(argv)
    Latency.median = args.latency_median_ms / 1000.0
    Latency.sigma = args.latency_sigma
    Latency.rng = random.Random(args.seed)
    asyncio.run(serve(args.host, args.port, args.delay_ms, args.exit_on_eof))


# --------------------------------------------------------------------------- parent side
class ServerProcess:
    """Starts ``python -m bench.server`` in its own process; ``url``, ``stats()``, ``close()``."""

    def __init__(
        self,
        delay_ms: float = 0.0,
        host: str = "127.0.0.1",
        *,
        latency_median_ms: float = 0.0,
        latency_sigma: float = 1.0,
        seed: int = 0,
    ) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-m", "bench.server", "--host", host, "--delay-ms", str(delay_ms)]
        if latency_median_ms > 0:
            cmd += ["--latency-median-ms", str(latency_median_ms),
                    "--latency-sigma", str(latency_sigma), "--seed", str(seed)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd + ["--exit-on-eof"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"bench server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.final_stats: dict[str, Any] | None = None

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url + "/bench/stats", timeout=10) as response:
            return orjson.loads(response.read())

    def reset(self) -> None:
        import urllib.request

        request = urllib.request.Request(self.url + "/bench/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (Linux /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            return float("nan")

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
            out = self.proc.stdout.read()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
            return
        for line in out.splitlines():
            if line.startswith("STATS "):
                self.final_stats = orjson.loads(line[6:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
