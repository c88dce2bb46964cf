"""The ``sglrun`` console script, kept tiny: signals are taken over before anything heavy
(typer, the engine) is imported, so a Ctrl-C or SIGTERM at any moment of start-up is the
same clean exit 130 as one during the run."""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["main"]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    for name in ("SIGTERM", "SIGHUP"):  # stop as on Ctrl-C (exit 130), never mid-engine
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _interrupt)
    try:
        from sglrun.cli.app import main as run_app

        run_app()  # handles its own interrupts once it runs
    except KeyboardInterrupt:  # during start-up, before any work
        sys.stderr.write("sglrun: interrupted\n")
        sys.exit(130)
