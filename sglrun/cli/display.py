"""Everything the user sees on stderr while a batch runs: progress, live text, the summary.

This is the only module that uses Rich, and it imports Rich inside functions, so ``import
sglrun`` and ``sglrun --help`` never pay for it. When stderr is not a terminal (a log file, a
pipe, CI), or with ``--quiet`` or ``TERM=dumb``, nothing animates and no ANSI code is written:
only one summary line at the end. ``NO_COLOR`` turns colour off. stdout is never touched here.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from sglrun.batch.runner import BatchStats
    from sglrun.cli.config import Settings
    from sglrun.lang.state import ProgramState

__all__ = [
    "BatchDisplay",
    "StreamPanel",
    "batch_progress",
    "format_settings",
    "format_summary",
    "is_animated",
]

_REFRESH_PER_SECOND = 4  # also how often the stream panel polls the states' text
_PANEL_ROWS = 8


def is_animated(stream: TextIO | None = None, *, quiet: bool = False) -> bool:
    """Whether a live display may be drawn on ``stream`` (stderr by default)."""
    stream = stream if stream is not None else sys.stderr
    if quiet or os.environ.get("TERM", "") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _console(stream: TextIO | None = None) -> Any:
    from rich.console import Console

    return Console(
        file=stream if stream is not None else sys.stderr,
        no_color=bool(os.environ.get("NO_COLOR")),
        highlight=False,
        soft_wrap=False,
    )


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _latency(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else _seconds(value)


def format_summary(
    stats: BatchStats, output: str | None = None, retries: int = 0, cache: str | None = None
) -> str:
    """The one line printed at the end of a batch, e.g.
    ``sglrun: 24 rows, 23 ok, 1 failed, 3.2 rows/s, 210 tok/s, tokens 9,120 in / 1,575 out,
    850 ms/row, 7.5 s -> out.jsonl`` (s/row: a row's own mean run time, its latency)."""
    head = "sglrun: interrupted after" if stats.status == "interrupted" else "sglrun:"
    rows = stats.done + stats.skipped
    parts = [f"{head} {rows} rows", f"{stats.ok} ok", f"{stats.failed} failed"]
    if stats.skipped:
        parts.append(f"{stats.skipped} skipped (already done)")
    if stats.abandoned:
        parts.append(f"{stats.abandoned} abandoned")
    if retries:
        parts.append(f"{retries} {'retry' if retries == 1 else 'retries'}")
    parts += [
        f"{_rate(stats.rows_per_second)} rows/s",
        f"{_rate(stats.tokens_per_second)} tok/s",
        f"tokens {stats.prompt_tokens:,} in / {stats.tokens:,} out",
        f"{_latency(stats.mean_latency)}/row",
        *([cache] if cache else []),
        _seconds(stats.elapsed),
    ]
    line = ", ".join(parts)
    return f"{line} -> {output}" if output else line


# ----------------------------------------------------------------------------- run_batch


@contextmanager
def batch_progress(total: int | None, description: str) -> Iterator[Callable[[ProgramState], None]]:
    """A progress bar for ``run_batch(progress_bar=True)``; yields ``advance(state)``.

    Thread-safe: ``advance`` may be called from the worker threads as rows finish.
    """
    lock = threading.Lock()
    counts = {"done": 0, "failed": 0}
    started = time.monotonic()
    animated = is_animated()
    progress = task = None
    if animated:
        progress = _new_progress(_console())
        task = progress.add_task(description, total=total, errors=0, info="")
        progress.start()

    def advance(state: ProgramState) -> None:
        failed = state.error() is not None
        with lock:
            counts["done"] += 1
            counts["failed"] += int(failed)
            done, errors = counts["done"], counts["failed"]
        if progress is not None:
            rate = done / max(1e-9, time.monotonic() - started)
            progress.update(task, completed=done, errors=errors, info=f"{_rate(rate)} rows/s")

    try:
        yield advance
    finally:
        if progress is not None:
            progress.stop()
        elapsed = time.monotonic() - started
        sys.stderr.write(
            f"sglrun: {description}: {counts['done']} rows, {counts['failed']} failed, "
            f"{_seconds(elapsed)}\n"
        )
        sys.stderr.flush()


def _new_progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TextColumn("{task.fields[errors]} errors"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=_REFRESH_PER_SECOND,
        transient=False,
    )


# ----------------------------------------------------------------------------- sglrun batch


class StreamPanel:
    """The text of the rows in flight, read from each state a few times per second.

    Workers ``track``/``untrack`` states; Rich calls ``__rich__`` on every refresh, which is
    when the text is polled (``state.text_so_far()`` never waits).
    """

    def __init__(self, rows: int = _PANEL_ROWS) -> None:
        self._rows = rows
        self._lock = threading.Lock()
        self._states: dict[int, tuple[str, ProgramState]] = {}

    def track(self, key: int, label: str, state: ProgramState) -> None:
        with self._lock:
            self._states[key] = (label, state)

    def untrack(self, key: int) -> None:
        with self._lock:
            self._states.pop(key, None)

    def __rich__(self) -> Any:
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            shown = sorted(self._states.items())[: self._rows]
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(style="bold cyan", no_wrap=True, max_width=16)
        table.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        for _, (label, state) in shown:
            text = " ".join(state.text_so_far()[-400:].split())
            table.add_row(label, Text(text[-200:]))
        if not shown:
            table.add_row("", Text("waiting for rows...", style="dim"))
        return Panel(table, title="rows in flight", border_style="dim")


class BatchDisplay:
    """Progress (rows, rows/s, tokens/s, errors, ETA) and the live text panel on stderr.

    Used as a context manager around the run; ``update`` is the runner's ``on_progress``.
    In plain mode it draws nothing and ``close`` prints the summary line only.
    """

    def __init__(
        self,
        *,
        total: int | None,
        description: str,
        output: str | None,
        quiet: bool = False,
        stream_text: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.output = output
        self.animated = is_animated(self.stream, quiet=quiet)
        self.stream_panel: StreamPanel | None = (
            StreamPanel() if stream_text and self.animated else None
        )
        self._description = description
        self._total = total
        self._console: Any = None
        self._progress: Any = None
        self._live: Any = None
        self._task: Any = None
        self._last = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> BatchDisplay:
        if not self.animated:
            return self
        self._console = _console(self.stream)
        self._progress = _new_progress(self._console)
        self._task = self._progress.add_task(
            self._description, total=self._total, errors=0, info=""
        )
        if self.stream_panel is not None:
            from rich.console import Group
            from rich.live import Live

            self._live = Live(
                Group(self.stream_panel, self._progress),
                console=self._console,
                refresh_per_second=_REFRESH_PER_SECOND,
                transient=True,
            )
            self._live.start()
        else:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            if self._progress is not None:  # the final bar stays on screen
                self._console.print(self._progress)
        elif self._progress is not None:
            self._progress.stop()
        self._progress = None

    def count_total(self, source: Any, limit: int | None = None) -> None:
        """Count the input's rows on the side (``source.count_rows()``), so the first rows
        need not wait for a big file to be read twice; the bar gets its total when known."""
        if not self.animated:
            return

        def count() -> None:
            try:
                total = source.count_rows()
            except Exception:
                return
            if total is not None:
                self.set_total(min(total, limit) if limit else total)

        threading.Thread(target=count, name="sglrun-count", daemon=True).start()

    def set_total(self, total: int | None) -> None:
        """The row count, when it arrives (counting a big file runs in the background)."""
        self._total = total
        with self._lock:
            if self._progress is not None and total is not None:
                self._progress.update(self._task, total=total)

    def update(self, stats: BatchStats) -> None:
        """Refresh the numbers; cheap enough to call after every row."""
        if self._progress is None:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < 0.1 and stats.status == "running":
                return
            self._last = now
            info = f"{_rate(stats.rows_per_second)} rows/s {_rate(stats.tokens_per_second)} tok/s"
            progress = self._progress
            if progress is not None:
                progress.update(
                    self._task,
                    completed=stats.done + stats.skipped,
                    errors=stats.failed,
                    info=info,
                )

    def note(self, message: str) -> None:
        """A line on stderr that does not tear the live display."""
        if self._console is not None and (self._live is not None or self._progress is not None):
            self._console.print(message, markup=False, highlight=False)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def summary(self, stats: BatchStats, retries: int = 0, cache: str | None = None) -> None:
        """Print the final summary line (always, even with --quiet)."""
        self.stream.write(format_summary(stats, self.output, retries, cache) + "\n")
        self.stream.flush()


def format_settings(settings: Settings) -> str:
    """``sglrun config show``: each setting, its value and where it came from. Built from
    ``Settings.masked()``, so an API key can never be shown, only whether it is set."""
    shown = settings.masked()
    sources = shown.pop("sources", {})
    rows = []
    for key, value in shown.items():
        if value is None or value == []:
            text = "-"
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        where = sources.get(key, "")
        if key == "api_key":
            where = f"env {settings.api_key_env}" if settings.api_key_env else "no api_key_env"
        rows.append((key, text, where))
    width = max(len(key) for key, _, _ in rows)
    value_width = min(40, max(len(text) for _, text, _ in rows))
    lines = [
        f"{key:<{width}}  {text:<{value_width}}  {where}".rstrip() for key, text, where in rows
    ]
    return "\n".join(lines)
