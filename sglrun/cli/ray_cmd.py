"""``sglrun batch ... --ray``: the CLI side of a scaled-out run (``sglrun/ray`` does the work).

Ray is imported only here and below, and only once ``--ray`` is given: the local path never
loads it. What each worker builds (program, backend, cache) is described by ``WorkerSetup``,
a small picklable object: the model loads in the workers, not on the driver.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    fail,
    one_line,
    run_defaults,
    say,
)
from sglrun.errors import InputError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings
    from sglrun.cli.options import SharedFlags
    from sglrun.lang.function import SglFunction
    from sglrun.ray.worker import WorkerParts

__all__ = ["RayBatch", "WorkerSetup", "ray_batch", "ray_settings", "refuse_local_only"]

PART_FORMATS = ("jsonl", "parquet")

#: Flags of local mode that have no meaning on a cluster: refused, never silently ignored.
LOCAL_ONLY = {
    "stream": "--stream", "unordered": "--unordered", "window": "--window", "limit": "--limit",
    "joblog": "--joblog", "dry_run": "--dry-run", "batch_api": "--batch-api",
    "retry_errors": "--retry-errors", "force": "--force", "max_failures": "--max-failures",
    "delimiter": "--delimiter",
}  # fmt: skip


def refuse_local_only(params: dict[str, Any]) -> None:
    for name, flag in LOCAL_ONLY.items():
        if params.get(name) not in (None, False):
            raise InputError(f"{flag} does not apply with --ray (it is a flag of local runs)")


def ray_settings(settings: Settings, address: str) -> Any:
    """``--ray ADDRESS`` over the ``ray:`` section of the settings."""
    from sglrun.ray.driver import RaySettings

    section = dict(settings.ray or {})
    configured = section.pop("address", None)
    chosen = address or configured or os.environ.get("RAY_ADDRESS") or "local"
    low, high = section.pop("workers", (None, None))
    return RaySettings(address=chosen, min_workers=low, max_workers=high, **section)


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """How a worker builds its parts: the same settings as the command line, in its process."""

    settings: Settings
    backend_name: str
    insecure: bool
    program_path: str
    function: str | None

    def __call__(self) -> WorkerParts:
        from sglrun.cli.cache_cmd import open_call_cache
        from sglrun.cli.loader import auto_threads, build_backend, load_program
        from sglrun.ray.worker import WorkerParts

        program = load_program(self.program_path, self.function)
        backend = build_backend(self.settings, self.backend_name, insecure=self.insecure)
        cache = open_call_cache(self.settings, default_on=True)
        if cache is not None:
            cache.identity(backend)
        return WorkerParts(
            program=program, backend=backend, defaults=run_defaults(self.settings),
            concurrency=auto_threads(self.settings, self.backend_name, backend), cache=cache,
        )  # fmt: skip


@dataclasses.dataclass
class RayBatch:
    """One ``sglrun batch --ray``: ``prepare`` (exit 2 on an error, nothing ran) then ``run``."""

    fn: SglFunction
    shared: SharedFlags
    settings: Settings
    backend_name: str
    inputs: list[str]
    out: str
    address: str
    program_path: str
    function: str | None
    options: Any  # RunOptions
    part_format: str = "jsonl"
    resume: bool = False
    overwrite: bool = False

    def prepare(self) -> None:
        from sglrun.batch.manifest import program_fingerprint
        from sglrun.ray.driver import RayJob

        if self.part_format not in PART_FORMATS:
            raise InputError(
                f"--format {self.part_format}: with --ray it names the parts' format: jsonl or "
                "parquet (inputs are known by their suffix)"
            )
        settings = self.settings
        ray = ray_settings(settings, self.address)
        if self.backend_name == "local" and settings.engine_threads == "auto":
            # One engine per worker: its threads are the worker's CPUs, or they spin
            # against each other (llama.cpp's threads wait by spinning).
            threads = max(1, int(ray.cpus_per_worker))
            settings = dataclasses.replace(settings, engine_threads=threads)
        setup = WorkerSetup(settings, self.backend_name, self.shared.insecure,
                            os.path.abspath(self.program_path), self.function)  # fmt: skip
        self.job = RayJob(
            inputs=self.inputs, outdir=self.out, setup=setup, options=self.options,
            program={"path": self.program_path, "function": self.fn.name,
                     "fingerprint": program_fingerprint(self.program_path, self.fn.name)},
            ray=ray, part_format=self.part_format, resume=self.resume,
            overwrite=self.overwrite, verbose=self.shared.verbose,
        )  # fmt: skip
        if self.backend_name != "local":  # a wrong URL or model: one line now, as locally
            from sglrun.cli.common import shutdown_backend
            from sglrun.cli.loader import build_backend

            shutdown_backend(build_backend(settings, self.backend_name,
                                           insecure=self.shared.insecure))  # fmt: skip
        self.job.prepare()
        try:
            self._check_first_rows()
        except BaseException:
            self.job.out.release()
            raise

    def _check_first_rows(self) -> None:
        """What a CSV header or Parquet schema alone shows wrong: exit 2 before any worker."""
        from sglrun.batch.convert import check_columns, param_specs

        options = self.options
        for item, first in self.job.first_rows():
            if item.format == "jsonl" or first is None:
                continue
            check_columns(
                first, param_specs(self.fn.func), mapping=options.mapping or None,
                strict=options.strict, id_field=options.id_field,
                source=f"{item.path}: {'header' if item.format != 'parquet' else 'columns'}",
            )  # fmt: skip

    def run(self) -> NoReturn:
        from sglrun.batch.setup import stop_on_signals
        from sglrun.cli.display import BatchDisplay
        from sglrun.ray.driver import run_on_ray

        display = BatchDisplay(
            total=None, description=self.fn.name, output=self.out, quiet=self.shared.quiet,
            stream_text=False,
        )  # fmt: skip
        stop = threading.Event()
        if not self.shared.quiet:
            say(f"sglrun: {len(self.job.blocks)} blocks; starting Ray ({self.job.ray.address})")
        with stop_on_signals(stop), display:
            display.set_total(sum(block.rows or 0 for block in self.job.blocks) or None)
            stats = run_on_ray(
                self.job, on_progress=display.update, stop=stop,
                on_warning=lambda message: display.note(f"sglrun: warning: {message}"),
            )  # fmt: skip
            display.update(stats)
        from sglrun.cli.cache_cmd import cache_counts_text

        cache = cache_counts_text(stats.cache_hits, stats.cache_misses, stats.tokens_saved)
        display.summary(stats, 0, cache)
        self._exit(stats)

    def _exit(self, stats: Any) -> NoReturn:
        if stats.error is not None:
            if stats.error.startswith("a worker could not start") and not stats.done:
                fail(one_line(stats.error), EXIT_USAGE)  # nothing ran: as a local set-up error
            fail(f"the Ray run failed: {one_line(stats.error)}; the parts written are "
                 f"kept: run again with --resume", EXIT_FAILED)  # fmt: skip
        if stats.read_error is not None:
            fail(one_line(stats.read_error), EXIT_FAILED if stats.done else EXIT_USAGE)
        if stats.status == "interrupted":
            say(f"sglrun: interrupted; the parts written are kept: add --resume to finish "
                f"{self.out}")  # fmt: skip
            raise typer.Exit(EXIT_INTERRUPTED)
        if stats.failed:
            say(f"sglrun: {stats.failed} of {stats.done} rows failed; "
                'see the "error" field of their records')  # fmt: skip
        raise typer.Exit(EXIT_FAILED if stats.failed else EXIT_OK)


def ray_batch(
    params: dict[str, Any],
    fn: SglFunction,
    shared: SharedFlags,
    settings: Settings,
    backend_name: str,
    fields: set[str],
    input_columns: tuple[str, ...] | None,
) -> NoReturn:
    """``sglrun batch ... --ray``, from the parsed flags of ``batch``."""
    from sglrun.cli.batch_flags import parse_map

    try:
        import ray  # noqa: F401
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'sglrun[ray]'") from None
    from sglrun.ray.worker import RunOptions

    refuse_local_only(params)
    out = params.get("output")
    if not out or out == "-":
        raise InputError("--ray writes a directory of part files: name it with -o OUTDIR")
    timeout = params.get("row_timeout")
    timeout = settings.row_timeout if timeout is None else timeout
    options = RunOptions(
        include=frozenset(fields), mapping=parse_map(params.get("maps")) or None,
        strict=bool(params.get("strict")), id_field=params.get("id_field"),
        json_values=bool(params.get("json_values")), row_timeout=timeout or None,
        input_columns=input_columns,
    )  # fmt: skip
    job = RayBatch(
        fn, shared, settings, backend_name, inputs=list(params["inputs"]), out=out,
        address=params.get("ray") or "", program_path=params["program"],
        function=params.get("function"), options=options,
        part_format=(params.get("input_format") or "jsonl").lower(),
        resume=bool(params.get("resume")), overwrite=bool(params.get("overwrite")),
    )  # fmt: skip
    job.prepare()
    job.run()
