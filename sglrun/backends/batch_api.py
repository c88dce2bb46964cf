"""Provider batch APIs under the live backends: whole programs run as wavefronts of jobs.

Why a transport: the OpenAI and Anthropic backends build each request body and read each
answer exactly as they do live; in batch mode only the model call itself is swapped. A call
parks its program on the ``Wavefront``, a batcher that sends only once the hub has had nothing
to run and nothing new gathered for ``SETTLE`` seconds, that is once every live program waits
for its next call. The gathered calls then go out as one job (split at the provider's limits),
the jobs are polled with backoff, and each program resumes with its answer and runs on to its
next call: a program needs as many rounds as its longest chain of calls.

Each job's id and the calls in it (``custom_id``: a hash of the request, numbered when the
same sampled request comes twice in one round; a greedy one goes once) are written to the
run's jobs file as soon as the job exists, so a process that stops re-attaches to the jobs
still running instead of paying for the calls again; answered calls land in the call cache,
which replays them on the rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson

from sglrun.errors import BackendError, BatchJobError, InvalidArgumentError

__all__ = [
    "BATCH_IN_FLIGHT",
    "SETTLE",
    "BatchTransport",
    "Call",
    "JobStatus",
    "JobsFile",
    "ProviderAPI",
    "Result",
    "Wavefront",
    "batch_transport",
]

SETTLE = 0.5  # seconds with nothing new gathered before a round goes out as a job
BATCH_IN_FLIGHT = 20_000  # programs in flight in batch mode: one round holds them all
POLL_FIRST = 2.0  # seconds before the first status check; doubles up to POLL_MAX
POLL_MAX = 60.0
ROUNDS = 4  # a call that failed retryably (or expired) is sent again, at most this often
RESULTS_BYTES = 2 << 30  # a job's results file may be this big (the request files are <= 256 MB)
ENDED = frozenset({"completed", "ended", "failed", "expired", "cancelled", "canceled"})


@dataclasses.dataclass(slots=True)
class Call:
    """One model request a program waits for: the live backend's path and body."""

    path: str
    body: dict[str, Any]
    custom_id: str = ""

    def digest(self) -> str:
        text = orjson.dumps([self.path, self.body], option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(text, digest_size=16).hexdigest()


@dataclasses.dataclass(slots=True)
class JobStatus:
    """A job as the provider reports it."""

    state: str
    total: int = 0
    done: int = 0
    failed: int = 0
    message: str = ""  # why a job failed as a whole

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclasses.dataclass(slots=True)
class Result:
    """One call's line of a job's results: its answer body, or why it has none."""

    custom_id: str
    body: dict[str, Any] | None = None
    error: str = ""
    retryable: bool = False  # expired, cancelled, rate-limited or a server error: send again


class ProviderAPI(Protocol):
    """What a provider's batch API does for the wavefront (see ``batch_providers``)."""

    name: str
    max_requests: int
    max_bytes: int

    def line(self, call: Call) -> bytes:
        """The call as one request of a job (one JSONL line, no newline)."""

    def submit(self, path: str, lines: list[bytes]) -> str:
        """Create a job of these requests (all to ``path``); return its id."""

    def status(self, job_id: str) -> JobStatus: ...

    def results(self, job_id: str) -> Iterator[Result]:
        """Every result line of an ended job (answers and errors)."""


class JobsFile:
    """The jobs of a run, beside its output (``None``: kept in memory only). Written to a
    temporary name and renamed, so a crash leaves the old file or the new, never half."""

    def __init__(self, path: str | None, provider: str) -> None:
        self.path = path
        self.provider = provider
        self.jobs: list[dict[str, Any]] = []
        self._owner: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path is not None and os.path.exists(path):
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, "rb") as handle:
                data = orjson.loads(handle.read())
            jobs = data["jobs"]
            provider = data.get("provider")
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendError(f"{path}: not a jobs file of sglrun ({exc})") from None
        if provider != self.provider:
            raise BackendError(
                f"{path}: holds {provider} jobs, not {self.provider} ones; "
                "run with the backend that made them"
            )
        for job in jobs:
            self._index(job)

    def _index(self, job: dict[str, Any]) -> None:
        self.jobs.append(job)
        for custom_id in job["calls"]:
            self._owner[custom_id] = job

    def owner(self, custom_id: str) -> dict[str, Any] | None:
        """The job that holds this call (the newest, if it went out more than once)."""
        return self._owner.get(custom_id)

    def add(self, job_id: str, path: str, custom_ids: list[str]) -> None:
        with self._lock:
            job = {"id": job_id, "path": path, "created": time.time(), "calls": custom_ids,
                   "state": "submitted"}  # fmt: skip
            self._index(job)
            self._save()

    def update(self, job_id: str, status: JobStatus) -> None:
        with self._lock:
            for job in self.jobs:
                if job["id"] == job_id and job.get("state") != status.state:
                    job["state"] = status.state
                    self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        data = {"version": 1, "provider": self.provider, "jobs": self.jobs}
        temporary = f"{self.path}.sglrun-tmp"
        with open(temporary, "wb") as handle:
            handle.write(orjson.dumps(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class Wavefront:
    """The batcher every model call of a batch-mode backend parks on (see the module)."""

    max_batch = 1 << 30  # one round is one send; ``send_together`` splits it into jobs
    max_in_flight = 1
    settle = SETTLE

    def __init__(
        self,
        api: ProviderAPI,
        jobs: JobsFile,
        *,
        poll: float = POLL_FIRST,
        detach: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        if poll <= 0:
            raise InvalidArgumentError("the batch poll interval must be > 0 seconds")
        self.api = api
        self.jobs = jobs
        self.poll = poll
        self.detach = detach
        self.on_detach: Callable[[], None] | None = None  # set by whoever can end the run
        self.on_progress = on_progress
        self.detached = False
        self.submitted = 0  # jobs created by this process
        self.requests = 0  # requests in them
        self._closed = threading.Event()
        self._last_report: tuple[int, int] | None = None
        self._first_seen: tuple[float, int] | None = None  # (when, requests done) first seen

    def close(self) -> None:
        self._closed.set()

    def send_together(self, groups: Sequence[list[Call]]) -> list[Any]:
        calls = [group[0] for group in groups]
        seen: dict[str, int] = {}
        unique: dict[str, Call] = {}
        for call in calls:
            base = call.digest()
            if call.body.get("temperature") == 0:  # greedy: one answer, asked (and paid) once
                call.custom_id = f"{base}-0"
            else:  # the same sampled request twice in a round: two samples, two ids
                seen[base] = seen.get(base, -1) + 1
                call.custom_id = f"{base}-{seen[base]}"
            unique.setdefault(call.custom_id, call)
        answers: dict[str, Any] = {}
        todo, attach = list(unique.values()), True
        for round_number in range(ROUNDS):
            results = self._round(todo, attach=attach)
            retry = []
            for call in todo:
                result = results.get(call.custom_id)
                if result is not None and result.body is not None:
                    answers[call.custom_id] = result.body
                elif result is not None and not result.retryable:
                    answers[call.custom_id] = BatchJobError(result.error)
                else:
                    retry.append(call)
                    reason = result.error if result is not None else "no result in the job"
                    answers[call.custom_id] = BatchJobError(
                        f"{reason} (sent {round_number + 1} times)"
                    )
            if not retry:
                break
            todo, attach = retry, False  # a retry goes out in a new job
        return [_fresh(answers[call.custom_id]) for call in calls]

    def _round(self, calls: list[Call], *, attach: bool) -> dict[str, Result]:
        """Send ``calls`` (re-attaching to the jobs that already hold them), wait for every
        job to end, and return each call's result."""
        waiting: dict[str, set[str]] = {}
        fresh: list[Call] = []
        for call in calls:
            job = self.jobs.owner(call.custom_id) if attach else None
            if job is not None and job.get("state") not in ("failed", "cancelled", "canceled"):
                waiting.setdefault(job["id"], set()).add(call.custom_id)
            else:
                fresh.append(call)
        for path, chunk in self._chunks(fresh):
            job_id = self.api.submit(path, [line for _, line in chunk])
            self.jobs.add(job_id, path, [call.custom_id for call, _ in chunk])
            self.submitted += 1
            self.requests += len(chunk)
            waiting[job_id] = {call.custom_id for call, _ in chunk}
            self._say(f"batch job {job_id}: {len(chunk)} requests submitted")
        statuses = self._wait(list(waiting))
        results: dict[str, Result] = {}
        for job_id, wanted in waiting.items():
            status = statuses[job_id]
            if status.state == "failed":
                reason = f"batch job {job_id} failed: {status.message or 'no reason given'}"
                for custom_id in wanted:
                    results[custom_id] = Result(custom_id, error=reason)
                continue
            for result in self.api.results(job_id):
                if result.custom_id in wanted:
                    results[result.custom_id] = result
        return results

    def _chunks(self, calls: list[Call]) -> Iterator[tuple[str, list[tuple[Call, bytes]]]]:
        """Jobs of one endpoint each, within the provider's request and byte limits."""
        by_path: dict[str, list[Call]] = {}
        for call in calls:
            by_path.setdefault(call.path, []).append(call)
        for path, group in by_path.items():
            chunk: list[tuple[Call, bytes]] = []
            size = 0
            for call in group:
                line = self.api.line(call)
                if len(line) + 1 > self.api.max_bytes:
                    raise BatchJobError(
                        f"one request is {len(line):,} bytes, over the batch API's limit of "
                        f"{self.api.max_bytes:,} per job"
                    )
                if chunk and (
                    len(chunk) >= self.api.max_requests or size + len(line) + 1 > self.api.max_bytes
                ):
                    yield path, chunk
                    chunk, size = [], 0
                chunk.append((call, line))
                size += len(line) + 1
            if chunk:
                yield path, chunk

    def _wait(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Poll every job until it has ended, the interval doubling up to ``POLL_MAX``."""
        statuses: dict[str, JobStatus] = {}
        delay = self.poll
        while True:
            for job_id in job_ids:
                if job_id not in statuses or not statuses[job_id].ended:
                    statuses[job_id] = status = self.api.status(job_id)
                    self.jobs.update(job_id, status)
            if all(statuses[j].ended for j in job_ids):
                return statuses
            self._report(statuses)
            if self.detach:
                self._leave()
            if self._closed.wait(delay):
                raise BatchJobError("the backend was shut down while its batch jobs ran")
            delay = min(delay * 2, POLL_MAX)

    def _report(self, statuses: dict[str, JobStatus]) -> None:
        """A line when the counts moved: jobs running, requests done, and an ETA from the rate
        since this process began waiting."""
        total = sum(s.total for s in statuses.values())
        done = sum(s.done + s.failed for s in statuses.values())
        running = sum(1 for s in statuses.values() if not s.ended)
        if (running, done) == self._last_report:
            return
        self._last_report = (running, done)
        now = time.monotonic()
        if self._first_seen is None or done < self._first_seen[1]:
            self._first_seen = (now, done)
        eta = ""
        began, done_then = self._first_seen
        if done > done_then and total > done:
            left = (total - done) * (now - began) / (done - done_then)
            eta = f", about {_duration(left)} left"
        self._say(
            f"batch jobs: {running} of {len(statuses)} running, {done:,}/{total:,} requests{eta}"
        )

    def _leave(self) -> None:
        """``detach``: the jobs are recorded; end the run and never wait here."""
        self.detached = True
        if self.on_detach is not None:
            self.on_detach()
        self._closed.wait()
        raise BatchJobError("detached: the batch jobs are still running")

    def _say(self, message: str) -> None:
        if self.on_progress is not None:
            self.on_progress(message)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _fresh(answer: Any) -> Any:
    """Each waiting program raises its own exception object, never a shared one."""
    if isinstance(answer, BatchJobError):
        return BatchJobError(str(answer))
    return answer


class BatchTransport:
    """The live transport, except that model calls (``model_paths``) go through the
    wavefront. Anything else (a probe, a tokenizer) is sent live."""

    def __init__(self, live: Any, wave: Wavefront, model_paths: Sequence[str]) -> None:
        self.live = live
        self.wave = wave
        self.model_paths = frozenset(model_paths)

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        if method != "POST" or path not in self.model_paths:
            return self.live.request(method, path, body, **options)
        from sglrun.lang.hub import current_hub, current_task

        call = Call(path, dict(body))
        hub = current_hub()
        if hub is not None and current_task() is not None:
            answer = hub.gather(self.wave, [call])
        else:  # not on a hub (a single program): a round of its own
            answer = self.wave.send_together([[call]])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        raise BatchJobError("a batch API cannot stream; the backend asks for whole answers")

    def close(self) -> None:
        self.wave.close()
        self.live.close()

    def __getattr__(self, name: str) -> Any:  # pool, stats, redact, probe_timeout, ...
        return getattr(self.live, name)


def batch_transport(
    live: Any, api: ProviderAPI, model_paths: Sequence[str], jobs: str | None, poll: float | None
) -> BatchTransport:
    """``live`` in batch mode: its model calls wait for jobs of ``api``, recorded in ``jobs``
    (a file path, or None to keep them in memory)."""
    live.max_response_bytes = max(live.max_response_bytes, RESULTS_BYTES)
    wave = Wavefront(api, JobsFile(jobs, api.name), poll=POLL_FIRST if poll is None else poll)
    return BatchTransport(live, wave, model_paths)
