"""Process-wide settings, named as in SGLang (``sgl.global_config``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from sglrun.errors import BackendError

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.call_cache import CallCache

ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[Any], None]]]

__all__ = ["GlobalConfig", "adapt_backend", "dry_run_backend", "global_config"]


class GlobalConfig:
    def __init__(self) -> None:
        self.verbosity = 0
        self.default_backend: Backend | None = None
        # Pre-cache a batch's shared prompt prefix (found by a dry run) before the batch runs.
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True
        # Read by SGLang programs; backends that decode text themselves follow them.
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        # json_schema as SGLang's default grammar backend (xgrammar) reads it: an object
        # admits no properties it does not list unless it says so (False: JSON Schema's rule).
        self.strict_json_schema = True
        # Embedded engine: JSON with exactly ", " and ": " between items, no padding.
        self.compact_json = True
        # ``run_batch(progress_bar=True)``: (total, description) -> a context manager yielding
        # ``advance(state)``. Wired by the package (the CLI's display), never imported here.
        self.batch_progress: ProgressFactory | None = None
        # The call cache every run uses unless it says otherwise (``sgl.set_cache``).
        self.call_cache: CallCache | None = None
        self._lock = threading.Lock()

    def in_dry_run(self) -> bool:
        """A dry run (tracing) is running in this thread: no model call, no cache."""
        return getattr(_dry_run, "backend", None) is not None

    def resolve_backend(self, backend: Backend | None) -> Backend:
        """The given backend, else the default one; with none set, the registered default
        backend (the embedded engine on the default model) is started once (SGLang would fail
        here instead)."""
        dry: Backend | None = getattr(_dry_run, "backend", None)
        if dry is not None:  # a dry run (tracing): nested programs make no model call either
            return dry
        if backend is not None:
            adapted: Backend = adapt_backend(getattr(backend, "endpoint", backend))
            return adapted
        if self.default_backend is None:
            with self._lock:
                if self.default_backend is None:
                    from sglrun.lang.registry import BackendOptions, default_backend_entry

                    entry = default_backend_entry()
                    if entry is None:
                        raise BackendError(
                            "no backend set: call sgl.set_default_backend(...) or pass backend="
                        )
                    self.default_backend = entry.factory(BackendOptions())
        return self.default_backend


_dry_run = threading.local()  # .backend: the placeholder of the dry run this thread runs


def adapt_backend(backend: Any) -> Any:
    """A backend written against SGLang (``BaseBackend``) behind sglrun's contract (one
    adapter per backend object); any other backend as it is."""
    from sglrun.lang.base_backend import BaseBackend, SglangBackendAdapter

    if not isinstance(backend, BaseBackend):
        return backend
    adapter = backend.__dict__.get("_sglrun_adapter")
    if adapter is None:
        adapter = backend.__dict__["_sglrun_adapter"] = SglangBackendAdapter(backend)
    return adapter


@contextmanager
def dry_run_backend(backend: Backend) -> Iterator[None]:
    """While a dry run runs in this thread, every program it starts uses ``backend``."""
    previous = getattr(_dry_run, "backend", None)
    _dry_run.backend = backend
    try:
        yield
    finally:
        _dry_run.backend = previous


global_config = GlobalConfig()
