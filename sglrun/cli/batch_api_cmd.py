"""``sglrun batch --batch-api``: its flags, its jobs file beside the output, ``--status``,
and how a detached run ends (exit 75, run the same command again to go on).

Why the jobs file sits beside the output: the output and its jobs are one run. A rerun of the
same command finds the file, continues the output (as ``--resume`` would) and re-attaches
to the jobs still running; the calls already answered replay from the call cache.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.cli.common import (
    EXIT_CLOSED_PIPE,
    EXIT_DETACHED,
    EXIT_OK,
    one_line,
    say,
    silence_stdout,
)
from sglrun.errors import InputError, SglrunError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings

__all__ = ["BATCH_BACKENDS", "JOBS_SUFFIX", "BatchApiFlags", "detached_exit", "jobs_path"]

JOBS_SUFFIX = ".sglrun-batches.json"
BATCH_BACKENDS = ("openai", "anthropic")
DISCOUNT = 0.5  # both providers bill batch tokens at half the live price


def jobs_path(output: str) -> str:
    return output + JOBS_SUFFIX


@dataclasses.dataclass(frozen=True)
class BatchApiFlags:
    """``--batch-api`` and the flags that only mean something with it."""

    enabled: bool = False
    detach: bool = False
    status: bool = False
    poll: float | None = None

    def check(self, backend_name: str, output: str) -> None:
        """Usage errors (exit 2), before anything opens."""
        if not self.enabled:
            if self.detach or self.status or self.poll is not None:
                raise InputError("--detach, --status and --batch-poll go with --batch-api")
            return
        if backend_name not in BATCH_BACKENDS:
            raise InputError(f"--batch-api needs --backend openai or anthropic, not {backend_name}")
        if output == "-":
            raise InputError(
                "--batch-api needs an output file (-o FILE): the run's jobs are kept beside it"
            )
        if self.poll is not None and self.poll <= 0:
            raise InputError(f"--batch-poll must be > 0 seconds, got {self.poll}")

    def continues(self, output: str) -> bool:
        """A rerun of a batch-API run continues it: its output and jobs file exist."""
        return self.enabled and os.path.exists(jobs_path(output)) and os.path.exists(output)

    def backend_extra(self, output: str) -> dict[str, Any]:
        return {"batch": True, "batch_jobs": jobs_path(output), "batch_poll": self.poll}


def wavefront(backend: Any) -> Any:
    """The batch-mode backend's wavefront (``batch_api.Wavefront``)."""
    return backend.transport.wave


def _print_jobs(wave: Any) -> int:
    """One line per job on stdout, as the provider reports it now; returns how many run."""
    running = 0
    for job in wave.jobs.jobs:
        created = datetime.datetime.fromtimestamp(job["created"]).isoformat(timespec="seconds")
        try:
            status = wave.api.status(job["id"])
        except SglrunError as exc:
            typer.echo(f"{job['id']}\tunknown ({one_line(exc)})\t{len(job['calls'])} requests")
            continue
        running += not status.ended
        wave.jobs.update(job["id"], status)
        counts = f"{status.done + status.failed:,}/{status.total or len(job['calls']):,} done"
        failed = f", {status.failed:,} failed" if status.failed else ""
        typer.echo(f"{job['id']}\t{status.state}\t{counts}{failed}\tcreated {created}")
    return running


def show_status(settings: Settings, backend_name: str, output: str, insecure: bool) -> NoReturn:
    """``--status``: one line per job of the run."""
    from sglrun.cli.loader import build_backend

    path = jobs_path(output)
    if not os.path.exists(path):
        say(f"sglrun: {output}: no batch jobs yet ({path} does not exist)")
        raise typer.Exit(EXIT_OK)
    flags = BatchApiFlags(enabled=True)
    backend = build_backend(
        settings, backend_name, insecure=insecure, extra=flags.backend_extra(output)
    )
    wave = wavefront(backend)
    try:
        running = _print_jobs(wave)
    except BrokenPipeError:  # `| head`: not worth a word, as in a batch
        backend.shutdown()
        silence_stdout()
        raise typer.Exit(EXIT_CLOSED_PIPE) from None
    say(f"sglrun: {len(wave.jobs.jobs)} batch jobs, {running} still running")
    backend.shutdown()
    raise typer.Exit(EXIT_OK)


def summary_line(backend: Any) -> str | None:
    """What this process submitted, for the end of the run."""
    wave = wavefront(backend)
    if not wave.submitted:
        return None
    share = int(DISCOUNT * 100)
    return (
        f"sglrun: batch API: {wave.requests:,} requests in {wave.submitted} jobs submitted now, "
        f"billed at the batch discount ({share}% of the live price)"
    )


def detached_exit(backend: Any, standalone: bool) -> NoReturn:
    """The round is submitted (or still running): say so and exit 75."""
    say(
        "sglrun: batch jobs are still running; run the same command again to go on (each "
        "rerun re-attaches to them and replays the answered calls from the cache)"
    )
    if standalone:  # parked programs and the poller must not hold the exit
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_DETACHED)
    raise typer.Exit(EXIT_DETACHED)
