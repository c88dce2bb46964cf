"""What every command shares: exit codes, one-line messages, logging, backend shutdown.

Kept apart from the Typer wiring (``app.py``) so that the command modules import public
helpers from here instead of private ones from the app.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.errors import SglrunError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings

__all__ = [
    "EXIT_CLOSED_PIPE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "INVOCATION",
    "PROCESS",
    "VERBOSE",
    "fail",
    "is_terminal",
    "one_line",
    "resume_hint",
    "run_defaults",
    "say",
    "setup_logging",
    "shutdown_backend",
    "silence_stdout",
    "usage_errors",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_DETACHED = 75  # EX_TEMPFAIL: batch jobs still running, run the same command again
EXIT_CLOSED_PIPE = 141  # as a shell reports a process ended by SIGPIPE (`| head`)

INVOCATION: list[str] = []  # the arguments of this invocation, for the --resume hint


@dataclasses.dataclass
class _Process:
    standalone: bool = False  # True only when main() runs the real process (may os._exit)


PROCESS = _Process()


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    say(f"sglrun: error: {one_line(message)}")
    raise typer.Exit(code)


@contextmanager
def usage_errors() -> Iterator[None]:
    """SglrunErrors raised while setting up (before any row runs) are exit 2, one line."""
    try:
        yield
    except SglrunError as exc:
        fail(str(exc) or type(exc).__name__)


VERBOSE = [False]  # -v of the command running (tracebacks of program errors)


def setup_logging(verbose: bool) -> None:
    """``-v``: INFO from every ``sglrun.*`` logger on (the current) stderr."""
    import logging

    VERBOSE[0] = verbose
    root = logging.getLogger("sglrun")
    for handler in list(root.handlers):
        if getattr(handler, "_sglrun_cli", False):
            root.removeHandler(handler)
    if not verbose:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._sglrun_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("sglrun: %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run_defaults(settings: Settings) -> Any:
    from sglrun.lang.ir import SamplingParams

    return SamplingParams.defaults(**settings.sampling_params())


def shutdown_backend(backend: Any) -> None:
    try:
        backend.shutdown()
    except Exception:
        pass


def silence_stdout() -> None:
    """After a closed pipe (``| head``), keep Python's exit flush from complaining."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def resume_hint(output: str) -> str:
    import shlex

    from sglrun.backends.http_support import mask_url

    if output == "-":
        return "sglrun: interrupted; to resume later, write to a file with -o FILE and --resume"
    args = [mask_url(arg) for arg in INVOCATION if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "sglrun: interrupted; to continue, run: " + shlex.join(["sglrun", *args])


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
