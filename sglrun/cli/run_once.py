"""``sglrun run``: one program, its text streamed to a terminal, its variables as JSON."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sglrun.cli.common import (
    EXIT_CLOSED_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    VERBOSE,
    fail,
    is_terminal,
    run_defaults,
    say,
    shutdown_backend,
    silence_stdout,
)

if TYPE_CHECKING:
    from sglrun.cli.config import Settings
    from sglrun.lang.backend import Backend
    from sglrun.lang.function import SglFunction


def run_once(
    fn: SglFunction,
    backend: Backend,
    settings: Settings,
    arguments: dict[str, Any],
    json_only: bool,
) -> NoReturn:
    """Stream the text (unless --json), then print the variables; exit 1 if the program
    failed."""
    import json

    from sglrun.batch.runner import error_info
    from sglrun.batch.writers import to_jsonable
    from sglrun.lang.runtime import run_program

    out = sys.stdout
    # The text streams to a terminal: stdout if it is one, else stderr (so that
    # `sglrun run prog.py | jq` gets only the JSON), else nowhere (cron, both redirected).
    text_out = next((f for f in (sys.stdout, sys.stderr) if is_terminal(f)), None)
    stream = not json_only and text_out is not None
    from sglrun.cli.cache_cmd import open_call_cache

    cache = open_call_cache(
        settings, default_on=False, on_warning=lambda m: say(f"sglrun: warning: {m}")
    )
    try:
        state = run_program(
            fn, backend, arguments, run_defaults(settings), stream=stream, cache=cache or False
        )
        if stream and text_out is not None:
            ended_with_newline = True
            for piece in state.text_iter():
                text_out.write(piece)
                text_out.flush()
                ended_with_newline = piece.endswith("\n")
            if not ended_with_newline:
                text_out.write("\n")
        error = state.error()
        variables = state.variables()
        out.write(json.dumps(to_jsonable(variables), ensure_ascii=False, indent=2) + "\n")
        out.flush()
        if cache is not None:
            from sglrun.lang.call_cache import release_store

            cache.finish()
            release_store(cache.store)
    except KeyboardInterrupt:
        shutdown_backend(backend)
        say("sglrun: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        shutdown_backend(backend)
        silence_stdout()
        raise typer.Exit(EXIT_CLOSED_PIPE) from None
    shutdown_backend(backend)
    if error is not None:
        info = error_info(error) or {}
        where = program_line(error, fn)
        if VERBOSE[0]:
            import traceback

            traceback.print_exception(error, file=sys.stderr)
        fail(f"{where}{info.get('type')}: {info.get('message')}", EXIT_FAILED)
    raise typer.Exit(EXIT_OK)


def program_line(error: BaseException, fn: SglFunction) -> str:
    """``FILE:LINE: `` of the program's own line that raised ``error`` ("" if none did)."""
    import traceback

    code = getattr(getattr(fn, "func", None), "__code__", None)
    path = os.path.abspath(code.co_filename) if code is not None else None
    where = ""
    for frame in traceback.extract_tb(error.__traceback__):
        if path and frame.filename and os.path.abspath(frame.filename) == path:
            where = f"{os.path.relpath(path)}:{frame.lineno}: "
    return where
