"""Loopback stand-ins for the two provider batch APIs, written to their documented shapes.

``OpenAIBatchStub``: ``GET /v1/models``; live ``POST /v1/chat/completions``; ``POST /v1/files``
(multipart, purpose ``batch``); ``POST /v1/batches``; ``GET /v1/batches/{id}``;
``GET /v1/files/{id}/content``. Output lines ``{id, custom_id, response: {status_code,
request_id, body}, error}``; requests an expired batch never reached go to the error file as
``batch_expired``.

``AnthropicBatchStub``: ``POST /v1/messages/batches`` (``requests``: ``custom_id`` and
``params``), ``GET /v1/messages/batches/{id}`` (``processing_status``, ``request_counts``,
``results_url``) and ``GET /v1/messages/batches/{id}/results`` (JSONL of ``result`` with type
``succeeded``, ``errored``, ``canceled`` or ``expired``); live ``POST /v1/messages``.

The "model" answers from the conversation: to "Is it positive?" it says "yes" when the
question's number is even, else "no"; to anything else "answer to <the last user text>" (with
the sample number when ``n`` > 1). A question holding ``PERMANENT`` gets a 400 error in the
results; one holding ``FLAKY`` gets a 500 the first time it is in a job.

A job ends ``delay`` seconds after it is created, or, with ``hold = True``, only once
``release()`` is called; ``expire_next`` makes the next job expire with every second request
unanswered. ``jobs`` keeps each job's requests, in order.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from typing import Any

from sglang_stub import StubServer

__all__ = ["THREE_STEPS", "AnthropicBatchStub", "OpenAIBatchStub", "answer_text"]

# The tests' program: an answer, a select on it, then a gen in one of two branches: 3 rounds.
THREE_STEPS = """
import sglrun as sgl


@sgl.function
def three(s, question: str):
    s += sgl.system("You are terse.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=16))
    s += sgl.user("Is it positive?")
    s += sgl.assistant(sgl.select("positive", choices=["yes", "no"]))
    if s["positive"] == "yes":
        s += sgl.user("Why?")
        s += sgl.assistant(sgl.gen("why", max_tokens=16))
    else:
        s += sgl.user("Why not?")
        s += sgl.assistant(sgl.gen("why_not", max_tokens=16))
"""

_NUMBER = re.compile(r"(\d+)")


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def answer_text(messages: list[dict[str, Any]], sample: int = 0) -> str:
    """What the stub model answers to a conversation."""
    users = [_text(m["content"]) for m in messages if m.get("role") == "user"]
    last, first = (users[-1] if users else ""), (users[0] if users else "")
    if "positive?" in last:
        found = _NUMBER.search(first)
        return "yes" if found and int(found.group(1)) % 2 == 0 else "no"
    suffix = f" #{sample}" if sample else ""
    return f"answer to {last}{suffix}"


class _Jobs:
    """Job bookkeeping both stubs share: creation, timing, release, flaky memory."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.delay = 0.2
        self.hold = False
        self.expire_next = False
        self.flaky_seen: set[str] = set()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)

    def create(self, prefix: str, requests: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        with self.lock:
            job = {
                "id": f"{prefix}_{next(self.ids)}",
                "requests": requests,
                "created": time.time(),
                "due": time.monotonic() + self.delay,
                "held": self.hold,
                "expire": self.expire_next,
                "results": None,
                **extra,
            }
            self.expire_next = False
            self.jobs.append(job)
        return job

    def release(self) -> None:
        with self.lock:
            self.hold = False
            for job in self.jobs:
                job["held"] = False
                job["due"] = min(job["due"], time.monotonic())

    def find(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs if j["id"] == job_id), None)

    def ended(self, job: dict[str, Any]) -> bool:
        return not job["held"] and time.monotonic() >= job["due"]

    def outcome(self, question: str) -> int:
        """The status a request gets: 400 permanent, 500 once for flaky, else 200."""
        if "PERMANENT" in question:
            return 400
        if "FLAKY" in question:
            with self.lock:
                if question not in self.flaky_seen:
                    self.flaky_seen.add(question)
                    return 500
        return 200

    def requests_sent(self) -> int:
        return sum(len(j["requests"]) for j in self.jobs)


def _first_user(messages: list[dict[str, Any]]) -> str:
    return next((_text(m["content"]) for m in messages if m.get("role") == "user"), "")


def _multipart(handler: Any, body: Any) -> dict[str, bytes]:
    raw = body.encode() if isinstance(body, str) else bytes(body or b"")
    head = f"Content-Type: {handler.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + raw)
    return {
        str(part.get_param("name", header="content-disposition")): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


class OpenAIBatchStub(StubServer):
    """OpenAI's files, batches and chat completions (see the module)."""

    def __init__(self, lifetime: float = 300.0) -> None:
        super().__init__(lifetime)
        self.batches = _Jobs()
        self.files: dict[str, bytes] = {}
        self.live_calls = 0

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        if body.get("response_format"):  # a schema: the answer as {"name": ...}
            text = json.dumps({"name": answer_text(body["messages"])})
            message = {"role": "assistant", "content": text}
            return {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": answer_text(body["messages"], i)},
                "finish_reason": "stop",
            }
            for i in range(n)
        ]
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": 7, "completion_tokens": 3},
        }

    def route(self, handler: Any, method: str, path: str, body: Any) -> None:
        if method == "GET" and path == "/v1/models":
            handler.send_json(200, {"data": [{"id": "gpt-stub", "owned_by": "openai"}]})
        elif method == "POST" and path == "/v1/chat/completions":
            self.live_calls += 1
            handler.send_json(200, self._chat(body))
        elif method == "POST" and path == "/v1/files":
            parts = _multipart(handler, body)
            if parts.get("purpose") != b"batch":
                handler.send_json(400, {"error": {"message": "purpose must be batch"}})
                return
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = parts["file"]
            handler.send_json(200, {"id": file_id, "object": "file", "purpose": "batch"})
        elif method == "POST" and path == "/v1/batches":
            data = self.files[body["input_file_id"]]
            requests = [json.loads(line) for line in data.splitlines() if line.strip()]
            ids = [r["custom_id"] for r in requests]
            if len(set(ids)) != len(ids) or any(r["url"] != body["endpoint"] for r in requests):
                handler.send_json(400, {"error": {"message": "duplicate custom_id or url"}})
                return
            job = self.batches.create("batch", requests, endpoint=body["endpoint"])
            handler.send_json(200, self._batch(job))
        elif method == "GET" and path.startswith("/v1/batches/"):
            job = self.batches.find(path.rsplit("/", 1)[1])
            if job is None:
                handler.send_json(404, {"error": {"message": "no such batch"}})
            else:
                handler.send_json(200, self._batch(job))
        elif method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            handler.send_text(200, self.files[path.split("/")[3]].decode())
        else:
            handler.send_json(404, {"error": {"message": f"no route {method} {path}"}})

    def _batch(self, job: dict[str, Any]) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": job["id"],
            "object": "batch",
            "endpoint": job["endpoint"],
            "completion_window": "24h",
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
        }
        total = len(job["requests"])
        if not self.batches.ended(job):
            view.update(
                status="in_progress", request_counts={"total": total, "completed": 0, "failed": 0}
            )
            return view
        if job["results"] is None:
            self._finish(job)
        out, err = job["results"]
        view.update(
            status="expired" if job["expire"] else "completed",
            output_file_id=out,
            error_file_id=err,
            request_counts={"total": total, "completed": job["ok"], "failed": total - job["ok"]},
        )
        return view

    def _finish(self, job: dict[str, Any]) -> None:
        output, errors, ok = [], [], 0
        for index, request in enumerate(job["requests"]):
            line: dict[str, Any] = {"id": f"req_{index}", "custom_id": request["custom_id"]}
            if job["expire"] and index % 2:
                line.update(
                    response=None,
                    error={"code": "batch_expired", "message": "not run before the window ended"},
                )
                errors.append(line)
                continue
            status = self.batches.outcome(_first_user(request["body"]["messages"]))
            if status == 200:
                body = self._chat(request["body"])
                ok += 1
            else:
                body = {"error": {"message": f"injected {status}", "code": f"e{status}"}}
            line.update(
                response={"status_code": status, "request_id": f"r{index}", "body": body},
                error=None,
            )
            (output if status == 200 else errors).append(line)
        out_id, err_id = f"file-out-{job['id']}", f"file-err-{job['id']}"
        self.files[out_id] = "\n".join(json.dumps(x) for x in output).encode() + b"\n"
        self.files[err_id] = "\n".join(json.dumps(x) for x in errors).encode() + b"\n"
        job["results"], job["ok"] = (out_id if output else None, err_id if errors else None), ok


class AnthropicBatchStub(StubServer):
    """Anthropic's Message Batches and Messages (see the module)."""

    def __init__(self, lifetime: float = 300.0) -> None:
        super().__init__(lifetime)
        self.batches = _Jobs()
        self.live_calls = 0

    @staticmethod
    def _message(params: dict[str, Any]) -> dict[str, Any]:
        if params.get("tool_choice"):  # a schema: the forced tool's call holds the answer
            tool = params["tool_choice"]["name"]
            call = {
                "type": "tool_use",
                "id": "toolu_stub",
                "name": tool,
                "input": {"name": answer_text(params["messages"])},
            }
            return {
                "id": "msg_stub",
                "type": "message",
                "role": "assistant",
                "content": [call],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 9, "output_tokens": 4},
            }
        return {
            "id": "msg_stub",
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": [{"type": "text", "text": answer_text(params["messages"])}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 3},
        }

    def route(self, handler: Any, method: str, path: str, body: Any) -> None:
        if method == "POST" and path == "/v1/messages":
            self.live_calls += 1
            handler.send_json(200, self._message(body))
        elif method == "POST" and path == "/v1/messages/batches":
            requests = body["requests"]
            if len({r["custom_id"] for r in requests}) != len(requests) or not all(
                re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", r["custom_id"]) for r in requests
            ):
                handler.send_json(
                    400,
                    {
                        "type": "error",
                        "error": {"type": "invalid_request_error", "message": "bad custom_id"},
                    },
                )
                return
            handler.send_json(200, self._view(self.batches.create("msgbatch", requests)))
        elif method == "GET" and path.startswith("/v1/messages/batches/"):
            parts = path.split("/")
            job = self.batches.find(parts[4])
            if job is None:
                handler.send_json(
                    404,
                    {"type": "error", "error": {"type": "not_found_error", "message": "no batch"}},
                )
            elif len(parts) == 6 and parts[5] == "results" and self.batches.ended(job):
                handler.send_text(200, "\n".join(json.dumps(x) for x in self._results(job)))
            else:
                handler.send_json(200, self._view(job))
        else:
            handler.send_json(
                404, {"type": "error", "error": {"type": "not_found_error", "message": path}}
            )

    def _view(self, job: dict[str, Any]) -> dict[str, Any]:
        total = len(job["requests"])
        ended = self.batches.ended(job)
        counts = {
            "processing": 0 if ended else total,
            "succeeded": total if ended else 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        }
        return {
            "id": job["id"],
            "type": "message_batch",
            "request_counts": counts,
            "processing_status": "ended" if ended else "in_progress",
            "results_url": f"{self.url}/v1/messages/batches/{job['id']}/results" if ended else None,
        }

    def _results(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        if job["results"] is None:
            lines = []
            for index, request in enumerate(job["requests"]):
                params = request["params"]
                if job["expire"] and index % 2:
                    result: dict[str, Any] = {"type": "expired"}
                elif (status := self.batches.outcome(_first_user(params["messages"]))) != 200:
                    kind = "invalid_request_error" if status == 400 else "api_error"
                    result = {
                        "type": "errored",
                        "error": {
                            "type": "error",
                            "error": {"type": kind, "message": f"injected {status}"},
                        },
                    }
                else:
                    result = {"type": "succeeded", "message": self._message(params)}
                lines.append({"custom_id": request["custom_id"], "result": result})
            job["results"] = lines
        return list(job["results"])
