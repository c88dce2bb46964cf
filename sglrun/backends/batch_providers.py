"""The two documented batch APIs, as the wavefront uses them (``batch_api.ProviderAPI``).

OpenAI Batch: the requests are uploaded as a JSONL file (``POST /files``, purpose ``batch``),
a batch is created on it for one endpoint with a 24 h window, and its output and error files
hold one line per request (``custom_id``, ``response.status_code``, ``response.body``,
``error``); requests a batch did not reach before it expired are in the error file as
``batch_expired``. Limits: 50,000 requests and 200 MB per file.

Anthropic Message Batches: the requests go in the create call itself (``custom_id``,
``params``); the batch ends with ``processing_status: ended`` and its results stream as JSONL,
each ``result`` of type ``succeeded`` (the message), ``errored``, ``canceled`` or ``expired``.
Limits: 100,000 requests and 256 MB per batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from sglrun.backends.batch_api import Call, JobStatus, Result
from sglrun.errors import BatchJobError

__all__ = ["AnthropicBatchAPI", "OpenAIBatchAPI"]

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def _lines(data: bytes | None) -> Iterator[dict[str, Any]]:
    for raw in (data or b"").splitlines():
        if raw.strip():
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise BatchJobError("a batch result file holds a line that is not JSON") from None
            if isinstance(entry, dict):
                yield entry


class OpenAIBatchAPI:
    """OpenAI's Batch API on ``transport`` (the backend's live one, its key included)."""

    name = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1000 * 1000

    def __init__(self, transport: Any, prefix: str, *, window: str = "24h") -> None:
        self.transport = transport
        self.prefix = prefix
        self.window = window

    def line(self, call: Call) -> bytes:
        return orjson.dumps(
            {"custom_id": call.custom_id, "method": "POST", "url": call.path, "body": call.body}
        )

    def submit(self, path: str, lines: list[bytes]) -> str:
        from urllib3 import encode_multipart_formdata

        data = b"\n".join(lines) + b"\n"
        payload, content_type = encode_multipart_formdata(
            {"purpose": "batch", "file": ("sglrun-batch.jsonl", data, "application/jsonl")},
            boundary=uuid.uuid4().hex,
        )
        uploaded = self.transport.request(
            "POST", f"{self.prefix}/files", payload, headers={"Content-Type": content_type}
        )
        file_id = (uploaded or {}).get("id") if isinstance(uploaded, dict) else None
        if not file_id:
            raise BatchJobError("the batch input file was uploaded but the server gave no id")
        created = self.transport.request(
            "POST",
            f"{self.prefix}/batches",
            {"input_file_id": file_id, "endpoint": path, "completion_window": self.window,
             "metadata": {"created_by": "sglrun"}},
        )  # fmt: skip
        if not isinstance(created, dict) or not created.get("id"):
            raise BatchJobError("the batch was created but the server gave no id")
        return str(created["id"])

    def _batch(self, job_id: str) -> dict[str, Any]:
        answer = self.transport.request("GET", f"{self.prefix}/batches/{job_id}")
        if not isinstance(answer, dict):
            raise BatchJobError(f"batch {job_id}: the server sent no batch object")
        return answer

    def status(self, job_id: str) -> JobStatus:
        batch = self._batch(job_id)
        counts = batch.get("request_counts") or {}
        errors = (batch.get("errors") or {}).get("data") or []
        message = "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict))
        return JobStatus(
            str(batch.get("status", "")),
            total=int(counts.get("total") or 0),
            done=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            message=message,
        )

    def results(self, job_id: str) -> Iterator[Result]:
        batch = self._batch(job_id)
        expired = batch.get("status") in ("expired", "cancelled")
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if not file_id:
                continue
            data = self.transport.request("GET", f"{self.prefix}/files/{file_id}/content", raw=True)
            for entry in _lines(data):
                yield self._result(entry, expired)

    @staticmethod
    def _result(entry: dict[str, Any], expired: bool) -> Result:
        custom_id = str(entry.get("custom_id", ""))
        response = entry.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            return Result(custom_id, body)
        error = entry.get("error") or (body or {}).get("error") or {}
        code = str(error.get("code") or "") if isinstance(error, dict) else ""
        message = str(error.get("message") or error) if error else f"status {status}"
        retryable = code == "batch_expired" or status in _RETRY_STATUS or expired and not status
        return Result(custom_id, error=f"{code or status}: {message}", retryable=retryable)


class AnthropicBatchAPI:
    """Anthropic's Message Batches on ``transport`` (``x-api-key`` and version headers)."""

    name = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1000 * 1000

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def line(self, call: Call) -> bytes:
        return orjson.dumps({"custom_id": call.custom_id, "params": call.body})

    def submit(self, path: str, lines: list[bytes]) -> str:
        payload = b'{"requests":[' + b",".join(lines) + b"]}"
        created = self.transport.request(
            "POST",
            "/v1/messages/batches",
            payload,
            headers={"Content-Type": "application/json"},
        )
        if not isinstance(created, dict) or not created.get("id"):
            raise BatchJobError("the message batch was created but the server gave no id")
        return str(created["id"])

    def status(self, job_id: str) -> JobStatus:
        batch = self.transport.request("GET", f"/v1/messages/batches/{job_id}")
        if not isinstance(batch, dict):
            raise BatchJobError(f"message batch {job_id}: the server sent no batch object")
        counts = batch.get("request_counts") or {}
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        done = int(counts.get("succeeded") or 0)
        return JobStatus(
            str(batch.get("processing_status", "")),
            total=done + failed + int(counts.get("processing") or 0),
            done=done,
            failed=failed,
        )

    def results(self, job_id: str) -> Iterator[Result]:
        data = self.transport.request("GET", f"/v1/messages/batches/{job_id}/results", raw=True)
        for entry in _lines(data):
            custom_id = str(entry.get("custom_id", ""))
            result = entry.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded" and isinstance(result.get("message"), dict):
                yield Result(custom_id, result["message"])
            elif kind == "errored":
                inner = (result.get("error") or {}).get("error") or result.get("error") or {}
                error_type = str(inner.get("type", "error"))
                retryable = error_type in ("api_error", "overloaded_error", "rate_limit_error")
                message = f"{error_type}: {inner.get('message', 'no message')}"
                yield Result(custom_id, error=message, retryable=retryable)
            else:  # canceled or expired: never ran
                yield Result(custom_id, error=str(kind or "no result"), retryable=True)
