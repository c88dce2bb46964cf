"""The driver of ``sglrun batch --ray``: plan the blocks, run them on an actor pool, count.

The pipeline is one Ray Data map: the pending block descriptors (``from_items``) through
``map_batches(BlockWorker, compute=ActorPoolStrategy(...))``, one block per call, to a stream
of summaries on the driver. There is no Ray write stage: workers write their own parts (named,
atomic), so nothing waits on a writer that an actor pool starves of CPUs, and nothing is
written under a random name. A worker that dies has its block retried by Ray on another actor;
its half-written part never had its final name. The driver saves the manifest as summaries
arrive, so a driver killed at any moment loses at most the blocks in flight, and ``--resume``
runs exactly those again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from sglrun.batch.runner import BatchStats
from sglrun.errors import InputError
from sglrun.ray.inputs import Block, InputFile, expand_inputs, file_digest, plan_blocks
from sglrun.ray.outdir import Manifest, OutputDir
from sglrun.ray.worker import BlockWorker, RunOptions, WorkerParts

__all__ = ["RayJob", "RaySettings", "run_on_ray"]

logger = logging.getLogger(__name__)

TASK_RETRIES = 3
_SAVE_EVERY = 1.0  # seconds between manifest saves while summaries arrive
_POLL = 0.1


@dataclass(frozen=True)
class RaySettings:
    """The ``ray:`` section: where to run and how big the pool and its blocks are."""

    address: str = "local"  # local (start one here), auto (a running cluster) or ADDRESS
    min_workers: int | None = None  # default: as many as the cluster's CPUs allow
    max_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    rows_per_block: int = 1000
    num_cpus: int | None = None  # CPUs of a cluster started here (default: this machine's)


@dataclass
class RayJob:
    """One scaled-out batch: ``prepare`` (InputError, nothing has run) then ``run``."""

    inputs: list[str]
    outdir: str
    setup: Callable[[], WorkerParts]
    options: RunOptions
    program: dict[str, Any]  # path, function, fingerprint (of its source)
    ray: RaySettings = field(default_factory=RaySettings)
    part_format: str = "jsonl"
    resume: bool = False
    overwrite: bool = False
    verbose: bool = False

    def fingerprint(self) -> str:
        """Program and every flag that shapes a record: parts of another run never mix in."""
        options = self.options
        described = {
            "program": self.program.get("fingerprint"), "function": self.program.get("function"),
            "include": sorted(options.include), "mapping": options.mapping,
            "strict": options.strict, "id_field": options.id_field,
            "json_values": options.json_values, "input_columns": options.input_columns,
            "format": self.part_format, **options.extra,
        }  # fmt: skip
        canonical = orjson.dumps(described, option=orjson.OPT_SORT_KEYS, default=str)
        return hashlib.blake2b(canonical, digest_size=6).hexdigest()

    def prepare(self) -> None:
        self.files: list[InputFile] = expand_inputs(self.inputs)
        self._refuse_inputs_inside()
        self.out = OutputDir(self.outdir, resume=self.resume, overwrite=self.overwrite)
        try:
            self.manifest = self._plan()
        except BaseException:
            self.out.release()
            raise

    def _refuse_inputs_inside(self) -> None:
        root = os.path.realpath(self.outdir)
        for item in self.files:
            if "://" not in item.path and os.path.realpath(item.path).startswith(root + os.sep):
                raise InputError(f"{item.path}: an input inside the output directory {self.outdir}")

    def _plan(self) -> Manifest:
        inputs = [{"path": f.path, "size": f.size, "digest": file_digest(f)} for f in self.files]
        fingerprint = self.fingerprint()
        previous = self.out.previous
        if previous is not None:
            if previous.inputs != inputs:
                raise InputError(
                    f"{self.outdir}: the inputs changed since its parts were written (files, "
                    "sizes or times differ); --overwrite reruns every row, or choose a new -o"
                )
            if previous.fingerprint != fingerprint:
                raise InputError(
                    f"{self.outdir}: written by another program or other record flags "
                    "(--include, --map, --id-field, --json-values, --format); --overwrite "
                    "reruns every row, or choose a new -o"
                )
            previous.status = "running"
            return previous
        blocks = plan_blocks(self.files, self.ray.rows_per_block)
        return Manifest(
            fingerprint=fingerprint, program=self.program, inputs=inputs,
            part_format=self.part_format, rows_per_block=self.ray.rows_per_block,
            blocks=[b.as_dict() for b in blocks],
        )  # fmt: skip

    @property
    def blocks(self) -> list[Block]:
        return [Block.from_dict(b) for b in self.manifest.blocks]

    def first_rows(self) -> list[tuple[InputFile, dict[str, Any] | None]]:
        """The first row of each file, for the checks local mode makes before running."""
        from sglrun.ray.inputs import open_block

        found = []
        for item in self.files:
            block = next((b for b in self.blocks if b.path == item.path), None)
            if block is None:
                continue
            source = open_block(block, self.options.id_field)
            try:
                first = next(iter(source), None)
            finally:
                source.close()
            found.append((item, first.data if first is not None else None))
        return found


def connect(settings: RaySettings, verbose: bool) -> Callable[[], None] | None:
    """Ray for this run; returns how to stop it when this process started it (else None).
    A cluster started here is watched by a guard (``guard.py``) in case this process dies
    unseen."""
    import ray

    if ray.is_initialized():
        return None
    quiet: dict[str, Any] = {"logging_level": logging.INFO if verbose else logging.ERROR,
                             "log_to_driver": verbose}  # fmt: skip
    guard = None
    try:
        if settings.address == "local":
            from sglrun.ray.guard import start_guard

            guard = start_guard()
            ray.init(num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False,
                     **quiet)  # fmt: skip
            if guard is not None:
                guard.watch(_cluster_pids())
        else:
            ray.init(address=settings.address, **quiet)
    except Exception as exc:  # a wrong address, no cluster there, a cluster that will not start
        if guard is not None:
            guard.close()
        raise InputError(
            f"--ray {settings.address}: cannot reach or start a Ray cluster "
            f"({' '.join(str(exc).split())[:200]}); start one with `ray start --head`, or use "
            "--ray local"
        ) from None

    def stop() -> None:
        try:
            ray.shutdown()
        finally:
            if guard is not None:
                guard.close()

    return stop


def _cluster_pids() -> list[int]:
    """The processes of the local cluster ray.init started (their descendants follow)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    return [info.process.pid for infos in processes.values() for info in infos
            if getattr(info, "process", None) is not None]  # fmt: skip


def _pool(settings: RaySettings, pending: int) -> tuple[int, int]:
    import ray

    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    for kind, wanted in (("CPU", settings.cpus_per_worker), ("GPU", settings.gpus_per_worker)):
        if settings.address == "local" and wanted > resources.get(kind, 0):
            raise InputError(
                f"ray: {kind.lower()}s_per_worker {wanted:g}, but the cluster started here has "
                f"{resources.get(kind, 0):g} {kind}s: no worker could ever start"
            )
    fit = max(1, int(cpus // settings.cpus_per_worker)) if settings.cpus_per_worker else cpus
    high = settings.max_workers or fit
    low = settings.min_workers or min(high, fit)
    high = max(1, min(high, pending))
    return max(1, min(low, high)), high


def _dataset(job: RayJob, pending: list[Block]) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    if not job.verbose:  # Ray Data's INFO lines would bury the progress bar
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # failures: our own line
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = 0  # a failed block fails the run: never dropped in silence
    low, high = _pool(job.ray, len(pending))
    items = [{"block": orjson.dumps(b.as_dict()).decode()} for b in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    return dataset.map_batches(
        BlockWorker, batch_size=1, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=2),
        num_cpus=job.ray.cpus_per_worker, num_gpus=job.ray.gpus_per_worker or None,
        # A dead worker is replaced as often as needed, but one block is tried at most
        # 1 + TASK_RETRIES times: a row that kills its process every time fails the run (its
        # parts kept) instead of looping for ever.
        max_restarts=-1, max_task_retries=TASK_RETRIES,
        fn_constructor_kwargs={
            "setup": job.setup, "options": job.options, "directory": job.out.path,
            "fingerprint": job.manifest.fingerprint, "part_format": job.part_format,
        },
    )  # fmt: skip


@dataclass
class RayStats(BatchStats):
    """BatchStats of a scaled-out run, plus what only it has."""

    workers: set[int] = field(default_factory=set)
    cache_hits: int = 0
    cache_misses: int = 0
    tokens_saved: int = 0
    error: str | None = None  # Ray itself failed (a worker could not start, the cluster died)


def run_on_ray(
    job: RayJob,
    *,
    on_progress: Callable[[BatchStats], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> RayStats:
    """Run every pending block of a prepared job; the manifest is saved as parts arrive."""
    stop = stop or threading.Event()
    manifest, out = job.manifest, job.out
    blocks = job.blocks
    out.missing_parts(manifest)
    out.adopt(manifest, blocks)
    pending = [b for b in blocks if b.name not in manifest.parts]
    stats = RayStats(total=sum(b.rows or 0 for b in blocks) or None)
    stats.skipped = manifest.totals()["rows"]
    out.save(manifest)
    stop_cluster: Callable[[], None] | None = None
    try:
        if pending:
            stop_cluster = connect(job.ray, job.verbose)
            _drive(job, pending, stats, on_progress, on_warning, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: the blocks in flight are abandoned
        stats.status = "interrupted"
    except BaseException:
        stats.status = "failed"
        raise
    finally:
        stats.finished = time.monotonic()
        if stats.status == "running":
            stats.status = "completed"
            if stats.error is not None:
                stats.status = "failed"
            elif stats.read_error is not None:
                stats.status = "read_error"
        manifest.status = stats.status
        try:
            out.adopt(manifest, blocks)  # parts written whose summary never arrived
            out.save(manifest)
        finally:
            out.release()
            if stop_cluster is not None:
                stop_cluster()
    return stats


def _drive(
    job: RayJob,
    pending: list[Block],
    stats: RayStats,
    on_progress: Callable[[BatchStats], None] | None,
    on_warning: Callable[[str], None] | None,
    stop: threading.Event,
) -> None:
    """Count the summaries as they come, saving the manifest at most once a second."""
    manifest, out = job.manifest, job.out
    summaries = _Summaries(_dataset(job, pending))
    last_save = time.monotonic()
    warned: set[str] = set()
    while not stop.is_set():
        kind, value = summaries.next(_POLL)
        if kind == "wait":
            continue
        if kind == "end":
            return
        if kind == "error":
            stats.error = _ray_error(value)
            return
        summary = orjson.loads(value["summary"])
        for message in summary.get("warnings", ()):
            if message not in warned and on_warning is not None:
                warned.add(message)
                on_warning(message)
        if "error" in summary:
            stats.read_error = InputError(summary["error"])
            return
        _count(stats, summary)
        manifest.parts[summary["block"]] = {k: summary[k] for k in _PART_KEYS}
        if time.monotonic() - last_save >= _SAVE_EVERY:
            out.save(manifest)
            last_save = time.monotonic()
        if on_progress is not None:
            on_progress(stats)
    stats.status = "interrupted"


_PART_KEYS = ("part", "rows", "ok", "failed", "tokens", "prompt_tokens", "started", "seconds")


def _count(stats: RayStats, summary: dict[str, Any]) -> None:
    stats.done += summary["rows"]
    stats.read += summary["rows"]
    stats.ok += summary["ok"]
    stats.failed += summary["failed"]
    stats.tokens += summary["tokens"]
    stats.prompt_tokens += summary["prompt_tokens"]
    stats.row_seconds += summary["row_seconds"]
    stats.cache_hits += summary["cache_hits"]
    stats.cache_misses += summary["cache_misses"]
    stats.tokens_saved += summary["tokens_saved"]
    stats.workers.add(summary["pid"])


def _ray_error(exc: BaseException) -> str:
    """One line from a Ray failure: its innermost cause, without the traceback."""
    name = type(exc).__name__
    text = str(exc)
    if "creation task" in text:  # the worker's set-up raised: its own last line says why
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return "a worker could not start: " + last.removeprefix("sglrun.errors.")
    if name.startswith("Actor") and ("Died" in name or "Unavailable" in name):
        return (
            f"a worker process died {1 + TASK_RETRIES} times on the same block (a row that "
            f"crashes or exhausts its worker?) ({name})"
        )
    cause: BaseException = exc
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:  # type: ignore[attr-defined]
        cause = cause.cause  # type: ignore[attr-defined]
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:500]


class _Summaries:
    """The dataset's rows consumed on a thread, so the driver can stop between them."""

    def __init__(self, dataset: Any) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(
            target=self._consume, args=(dataset,), name="sglrun-ray-results", daemon=True
        )
        self._thread.start()

    def _consume(self, dataset: Any) -> None:
        try:
            for row in dataset.iter_rows():
                self._queue.put(("row", row))
            self._queue.put(("end", None))
        except BaseException as exc:  # reported by the driver's loop
            self._queue.put(("error", exc))

    def next(self, timeout: float) -> tuple[str, Any]:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return "wait", None
