"""Backends by name: what ``--backend NAME`` and the default backend are chosen from.

The language never imports a concrete backend: the package registers each one by name with a
factory (``register_backend``), as chat templates are registered, and the one marked default
starts when a program runs with no backend set. A factory takes ``BackendOptions`` (the
settings a command line or config file can give any backend); a backend reads the ones it
has a use for.
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglrun.errors import InvalidArgumentError

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.chat_template import ChatTemplate

__all__ = [
    "BackendEntry",
    "BackendOptions",
    "backend_entry",
    "backend_names",
    "default_backend_entry",
    "register_backend",
]


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """What a user can say about any backend; each backend reads what applies to it."""

    model: str | None = None
    urls: tuple[str, ...] = ()
    api_key: str | None = None
    timeout: float | None = None
    retries: int | None = None
    verify: bool | None = None  # False: do not check TLS certificates
    coalesce: bool = True
    engine_threads: int | None = None  # the embedded engine's compute threads
    slots: int | None = None  # the embedded engine's parallel sequences
    ctx_size: int | None = None  # the embedded engine's context (all slots together)
    reproducible: bool = False  # the embedded engine: same greedy output run after run
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def transport_settings(self) -> dict[str, Any]:
        """``timeout`` and ``retries`` as keyword arguments, only those the user gave (a
        server backend keeps its own defaults for the rest)."""
        given = {"timeout": self.timeout, "retries": self.retries}
        return {key: value for key, value in given.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    """A registered backend: how to build it, and what a dry run may assume of it."""

    name: str
    factory: Callable[[BackendOptions], Backend]
    description: str = ""
    needs_model: bool = False  # ``--model`` is required (a hosted API's model name)
    # The chat template the backend would use, found without starting it (dry runs).
    chat_template: Callable[[BackendOptions], ChatTemplate] | None = None
    hidden: bool = False  # not offered to users (the test double)


_lock = threading.Lock()
_entries: dict[str, BackendEntry] = {}
_default: list[str] = []


def register_backend(
    name: str,
    factory: Callable[[BackendOptions], Backend],
    *,
    description: str = "",
    needs_model: bool = False,
    chat_template: Callable[[BackendOptions], ChatTemplate] | None = None,
    default: bool = False,
    hidden: bool = False,
) -> None:
    """Make ``name`` a backend ``--backend`` and configs can choose; ``default`` makes it
    the one that starts when a program runs with none set."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidArgumentError(f"a backend name must be a plain word, not {name!r}")
    entry = BackendEntry(name, factory, description, needs_model, chat_template, hidden)
    with _lock:
        _entries[name] = entry
        if default:
            _default[:] = [name]


def backend_names(*, hidden: bool = False) -> list[str]:
    """The names users can choose, the default first."""
    with _lock:
        names = [n for n, e in _entries.items() if hidden or not e.hidden]
        first = [n for n in _default if n in names]
    return first + [n for n in names if n not in first]


def backend_entry(name: str) -> BackendEntry:
    with _lock:
        entry = _entries.get(name)
    if entry is None:
        known = backend_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"no backend named {name!r}{hint} (backends: {', '.join(known)})"
        )
    return entry


def default_backend_entry() -> BackendEntry | None:
    with _lock:
        return _entries.get(_default[0]) if _default else None
