"""``sglrun cache stats|clear|prune``, and the call cache a ``run`` or ``batch`` uses."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from sglrun.cli.common import EXIT_FAILED, fail, one_line, usage_errors
from sglrun.cli.options import ConfigOpt, ProfileOpt
from sglrun.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

    from sglrun.cli.config import Settings
    from sglrun.lang.call_cache import CallCache

__all__ = ["cache_app", "open_call_cache", "parse_duration"]

cache_app = typer.Typer(
    help="The call cache: what it holds, and emptying it.", no_args_is_help=True,
    rich_markup_mode=None,
)  # fmt: skip

PathOpt = Annotated[
    Optional[str],
    typer.Option("--cache", "--path", metavar="PATH", help="The cache file [from the settings]."),
]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def open_call_cache(
    settings: Settings, *, default_on: bool, on_warning: Callable[[str], None] | None = None
) -> CallCache | None:
    """The run's cache from the settings (``--cache``, ``SGLRUN_CACHE``, ``cache:``), or
    None. Never fails: a cache that cannot be opened warns and the run goes uncached."""
    chosen = settings.cache if settings.cache is not None else default_on
    if chosen is False or settings.cache_mode == "off":
        return None
    from sglrun.lang.call_cache import CallCache, open_store

    store = open_store(
        None if chosen is True else str(chosen),
        max_bytes=settings.cache_max_size,
        on_warning=on_warning,
    )
    return CallCache(store, settings.cache_mode) if store.enabled else None


def cache_summary(cache: CallCache | None) -> str | None:
    """``cache 600 of 800 calls (12,300 tokens saved)`` for the summary line."""
    if cache is None:
        return None
    return cache_counts_text(cache.hits, cache.misses, cache.tokens_saved)


def cache_counts_text(hits: int, misses: int, tokens_saved: int) -> str | None:
    """The summary's cache words from counts (a scaled-out run sums its workers')."""
    if not hits + misses:  # nothing cacheable ran (or no cache): nothing to say
        return None
    saved = f" ({tokens_saved:,} tokens saved)" if hits else ""
    return f"cache {hits:,} of {hits + misses:,} calls{saved}"


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` or seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if found is None:
        raise InputError(f"--older-than: expected a duration like 30d, 12h or 90m, got {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


def _locate(path: str | None, config: str | None, profile: str | None) -> tuple[Path, Settings]:
    """The cache file the options name (whether or not it exists) and the settings."""
    from sglrun.cli.config import load_settings
    from sglrun.lang.cache_store import cache_file

    with usage_errors():
        settings = load_settings(config_file=config, profile=profile)
    where = path if path is not None else settings.cache
    if not isinstance(where, str):
        where = None  # true, false or unset: the default place
    return cache_file(where), settings


def _store(path: str | None, config: str | None, profile: str | None) -> Any:
    """The cache file the options name, opened; where there is none, one line says so (looking
    at a cache never makes one)."""
    file, settings = _locate(path, config, profile)
    if not file.exists():
        typer.echo(f"sglrun: no cache at {file}: nothing is cached there")
        raise typer.Exit(0)
    return _open(file, settings)


def _open(file: Path, settings: Settings) -> Any:
    from sglrun.lang.call_cache import open_store

    store = open_store(file, max_bytes=settings.cache_max_size)
    if not store.enabled:
        fail(f"{store.path}: {store.broken}", EXIT_FAILED)
    return store


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{count} B"


@cache_app.command("stats")
def stats(
    path: PathOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Entries, size on disk, and the hits and tokens it saved over all runs."""
    import dataclasses
    import json
    import sqlite3

    def show(found: Any) -> None:
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(found), indent=2))
            return
        per = f" ({found.bytes / found.entries:,.0f} B per entry)" if found.entries else ""
        lines = [
            ("path", found.path),
            ("entries", f"{found.entries:,}"),
            ("size", f"{_size(found.bytes)} of {_size(found.max_bytes)}{per}"),
            ("hits", f"{found.hits:,} (misses {found.misses:,})"),
            ("tokens saved", f"{found.tokens_saved:,}"),
            ("last used", f"{_when(found.oldest_use)} .. {_when(found.newest_use)}"),
        ]
        for name, value in lines:
            typer.echo(f"{name:<13} {value}")

    file, settings = _locate(path, config, profile)
    if not file.exists():  # looking at a cache never makes one
        from sglrun.lang.cache_store import DEFAULT_MAX_BYTES, CacheStats

        limit = settings.cache_max_size or DEFAULT_MAX_BYTES
        show(CacheStats(str(file), 0, 0, limit, 0, 0, 0, None, None))
        return
    store = _open(file, settings)
    try:
        found = store.stats()
    except sqlite3.Error as exc:
        fail(f"{store.path}: cannot read the cache ({one_line(exc)})", EXIT_FAILED)
    show(found)


@cache_app.command("clear")
def clear(path: PathOpt = None, config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Remove every entry (and the counters)."""
    import sqlite3

    store = _store(path, config, profile)
    try:
        removed = store.clear()
    except sqlite3.Error as exc:
        fail(f"{store.path}: cannot clear the cache ({one_line(exc)})", EXIT_FAILED)
    typer.echo(f"sglrun: removed {removed:,} entries from {store.path}")


@cache_app.command("prune")
def prune(
    older_than: Annotated[
        Optional[str],
        typer.Option("--older-than", metavar="AGE", help="Entries not used for AGE (30d, 12h)."),
    ] = None,
    max_size: Annotated[
        Optional[str],
        typer.Option("--max-size", metavar="SIZE", help="Then shrink to SIZE (500MB), LRU."),
    ] = None,
    path: PathOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Remove entries not used for a while, or the least recently used beyond a size."""
    import sqlite3

    from sglrun.lang.call_cache import parse_size

    with usage_errors():
        if older_than is None and max_size is None:
            raise InputError("prune needs --older-than AGE or --max-size SIZE")
        age = parse_duration(older_than) if older_than is not None else None
        try:
            size = parse_size(max_size) if max_size is not None else None
        except Exception as exc:
            raise InputError(f"--max-size: {exc}") from None
    store = _store(path, config, profile)
    try:
        removed = store.prune(older_than=age, max_bytes=size)
    except sqlite3.Error as exc:
        fail(f"{store.path}: cannot prune the cache ({one_line(exc)})", EXIT_FAILED)
    typer.echo(f"sglrun: removed {removed:,} entries from {store.path}")
