"""A loopback stand-in for an SGLang server, written to SGLang's documented native API.

``StubServer`` is the shared machinery (also used by ``anthropic_stub``): a
``ThreadingHTTPServer`` on 127.0.0.1 in a daemon thread that records every request and can be
told to misbehave (``fail(...)``: a status with a body and ``Retry-After``, a delay, or a reset
connection). It shuts itself down after ``lifetime`` seconds at the latest.

``SGLangStub`` serves /get_model_info, /generate (single or list ``text``, ``input_ids``, ``n``,
SSE streaming with cumulative text and ``data: [DONE]``, logprobs as (logprob, token_id, text)
triples), /flush_cache, /server_info (and the older /get_server_info).

Its "model" is deterministic. Tokens are words with their leading whitespace. It always
continues with the words of ``CONTINUATION``. The log-probability of a token is
``-0.5 * len(word)``, divided by 4 when the word already occurred earlier in the context, so
a prompt that mentions a word makes that word likelier.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import struct
import threading
import time
import zlib
from typing import Any

__all__ = ["CONTINUATION", "SGLangStub", "StubServer", "fake_logprob", "tokenize"]

CONTINUATION = " the quick brown fox jumps over the lazy dog"
_TOKEN = re.compile(r"\s*\S+|\s+")
_VOCAB: dict[int, str] = {}
_VOCAB_LOCK = threading.Lock()


def token_id(text: str) -> int:
    tid = zlib.crc32(text.encode()) % 50_000 + 100
    with _VOCAB_LOCK:
        _VOCAB[tid] = text
    return tid


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _word(token: str) -> str:
    return token.strip().strip(".,:;!?\"'").lower()


def fake_logprob(token: str, context: list[str]) -> float:
    word = _word(token)
    value = -0.5 * max(len(word), 1)
    if word and word in {_word(t) for t in context}:
        value /= 4
    return value


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self, method: str) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")
        path = self.path.split("?", 1)[0]
        stub.record(method, path, dict(self.headers), body)
        fault = stub.take_fault(path)
        if fault is not None:
            if fault.get("delay"):
                time.sleep(fault["delay"])
            if fault.get("reset"):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault.get("status"):
                headers = {}
                if fault.get("retry_after") is not None:
                    headers["Retry-After"] = str(fault["retry_after"])
                self.send_json(fault["status"], fault.get("body", {"error": {
                    "message": f"injected failure {fault['status']}"}}), headers)
                return
        try:
            stub.route(self, method, path, body)
        except Exception as exc:  # noqa: BLE001 - a stub reports its own bugs as 500
            self.send_json(500, {"error": {"message": f"stub error: {exc!r}"}})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_text(self, status: int, text: str) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's backlog is 5: a client opening ~100 connections at once (a batch's
    # programs in flight) then lost SYNs and waited out TCP's retransmission (1 s, 3 s, ...
    # 31 s), which looked like batches stalling or hanging.
    request_queue_size = 1024
    stub: StubServer


class StubServer:
    """Base of the stubs: start/stop, request log, fault injection. Subclasses ``route``."""

    def __init__(self, lifetime: float = 300.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.stream_delay = 0.0
        self.incremental = False  # as a server run with --incremental-streaming-output
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        self._stopped = False

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StubServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def record(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "headers": headers,
                                  "body": body, "time": time.monotonic()})

    def fail(self, path: str = "*", times: int = 1, **fault: Any) -> None:
        """Make the next ``times`` requests to ``path`` fail: ``status=`` (with ``body=``,
        ``retry_after=``), ``delay=`` seconds, or ``reset=True`` (connection reset)."""
        with self._lock:
            self.faults.extend({"path": path, **fault} for _ in range(times))

    def take_fault(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            for index, fault in enumerate(self.faults):
                if fault["path"] in ("*", path):
                    return self.faults.pop(index)
        return None

    def posted(self, path: str) -> list[Any]:
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()

    def route(self, handler: _Handler, method: str, path: str, body: Any) -> None:
        handler.send_json(404, {"error": {"message": f"no route {path}"}})


class SGLangStub(StubServer):
    model_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    def prompts(self) -> list[str]:
        """The prompt of every /generate item so far (list requests unpacked)."""
        found: list[str] = []
        for body in self.posted("/generate"):
            text = body.get("text") if isinstance(body, dict) else None
            found.extend(text if isinstance(text, list) else [text])
        return found

    def route(self, handler: _Handler, method: str, path: str, body: Any) -> None:
        if path == "/get_model_info" and method == "GET":
            handler.send_json(200, {"model_path": self.model_path,
                                    "tokenizer_path": self.model_path, "is_generation": True})
        elif path == "/server_info" and method == "GET":
            handler.send_json(200, {"version": "0.5.0-stub", "model_path": self.model_path,
                                    "tokenizer_path": self.model_path})
        elif path == "/get_server_info" and method == "GET":
            handler.send_json(200, {"version": "0.4.0-stub"})
        elif path == "/flush_cache":
            handler.send_text(200, "Cache flushed.\n")
        elif path == "/generate" and method == "POST":
            self.generate(handler, body)
        else:
            handler.send_json(404, {"detail": "Not Found"})

    # ------------------------------------------------------------------ model
    def generate(self, handler: _Handler, body: Any) -> None:
        if not isinstance(body, dict):
            handler.send_json(400, {"error": {"message": "request body must be a JSON object"}})
            return
        text, ids = body.get("text"), body.get("input_ids")
        if text is None and ids is None:
            handler.send_json(400, {"error": {"message": "Either text or input_ids should be "
                                                         "provided."}})
            return
        listed = body.get("sampling_params")
        for params in listed if isinstance(listed, list) else [listed or {}]:
            max_new = params.get("max_new_tokens", 128)
            if not isinstance(max_new, int) or max_new < 0:
                handler.send_json(400, {"error": {
                    "message": f"max_new_tokens must be at least 0, got {max_new}."}})
                return
            if params.get("regex") and params.get("json_schema"):
                handler.send_json(400, {"error": {"message": "regex and json_schema cannot be "
                                                             "both set."}})
                return
        if isinstance(text, list) or (ids and isinstance(ids[0], list)):
            prompts = text if text is not None else ids
            results = []
            for index, prompt in enumerate(prompts):
                item = item_options(body, index)
                results.append(self.one(prompt, item.get("sampling_params") or {}, item))
            handler.send_json(200, results)
            return
        params = listed or {}
        n = params.get("n", 1) or 1
        if body.get("stream"):
            self.stream(handler, text if text is not None else ids, params, body)
            return
        if n > 1:
            handler.send_json(200, [self.one(text if text is not None else ids, params, body)
                                    for _ in range(n)])
            return
        handler.send_json(200, self.one(text if text is not None else ids, params, body))

    def one(self, prompt: str | list[int], params: dict[str, Any], body: dict[str, Any]
            ) -> dict[str, Any]:
        if isinstance(prompt, list):
            tokens = [_VOCAB.get(t, "?") for t in prompt]
        else:
            tokens = tokenize(prompt)
        output, finish = self.continuation(params)
        with_text = bool(body.get("return_text_in_logprobs"))
        meta: dict[str, Any] = {
            "id": "stub",
            "finish_reason": finish,
            "prompt_tokens": len(tokens),
            "completion_tokens": len(output),
            "cached_tokens": 0,
        }
        if body.get("return_logprob"):
            start = body.get("logprob_start_len", -1)
            start = len(tokens) if start is None or start < 0 else start
            entries = []
            for position in range(start, len(tokens)):
                lp = None if position == 0 else fake_logprob(tokens[position], tokens[:position])
                entries.append([lp, token_id(tokens[position]),
                                tokens[position] if with_text else None])
            meta["input_token_logprobs"] = entries
            out_entries = []
            for index, token in enumerate(output):
                context = tokens + output[:index]
                out_entries.append([fake_logprob(token, context), token_id(token),
                                    token if with_text else None])
            meta["output_token_logprobs"] = out_entries
            values = [e[0] for e in entries if e[0] is not None]
            meta["normalized_prompt_logprob"] = sum(values) / len(values) if values else 0.0
            if body.get("top_logprobs_num"):
                meta["output_top_logprobs"] = [[e] for e in out_entries]
        return {"text": "".join(output), "meta_info": meta}

    def continuation(self, params: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        if params.get("json_schema"):
            words = ['{"ok":', " true}"]
        elif params.get("regex"):
            words = ["42"]
        else:
            words = tokenize(CONTINUATION)
        max_new = params.get("max_new_tokens", 128)
        output = words[:max_new]
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        if max_new >= len(words):
            finish = {"type": "stop", "matched": None}
        text = "".join(output)
        for stop in params.get("stop") or []:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                finish = {"type": "stop", "matched": stop}
                output = tokenize(text) if text else []
        return output, finish

    def stream(self, handler: _Handler, prompt: Any, params: dict[str, Any],
               body: dict[str, Any]) -> None:
        result = self.one(prompt, params, body)
        handler.start_sse()
        text = ""
        pieces = tokenize(result["text"]) or [""]
        for index, piece in enumerate(pieces):
            text += piece
            meta = dict(result["meta_info"])
            meta["completion_tokens"] = index + 1
            if index < len(pieces) - 1:
                meta["finish_reason"] = None
            # As the server: logprob lists so far (or, with --incremental-streaming-output,
            # only this token's, and the text as a delta).
            for key in ("output_token_logprobs", "output_top_logprobs"):
                if key in meta:
                    full = meta[key]
                    meta[key] = full[index : index + 1] if self.incremental else full[: index + 1]
                    meta["output_token_logprobs_length"] = index + 1
            sent = piece if self.incremental else text
            handler.send_chunk("data: " + json.dumps({"text": sent, "meta_info": meta}) + "\n\n")
            if self.stream_delay:
                time.sleep(self.stream_delay)
        handler.send_chunk("data: [DONE]\n\n")
        handler.end_chunks()


def free_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def item_options(body: dict[str, Any], index: int) -> dict[str, Any]:
    """The options of item ``index`` of a list request: SGLang takes each per-item option
    either as one value for all items or as a list with one value per item."""
    item = dict(body)
    for key in ("sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
                "image_data"):
        value = body.get(key)
        if isinstance(value, list):
            item[key] = value[index]
    return item
