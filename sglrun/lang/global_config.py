"""Process-wide settings, named as in SGLang (``sgl.global_config``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from sglrun.errors import BackendError

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend

ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[Any], None]]]

__all__ = ["GlobalConfig", "global_config"]


class GlobalConfig:
    def __init__(self) -> None:
        self.verbosity = 0
        self.default_backend: Backend | None = None
        # Pre-cache a batch's shared prompt prefix (found by a dry run) before the batch runs.
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True
        # ``run_batch(progress_bar=True)``: (total, description) -> a context manager yielding
        # ``advance(state)``. Wired by the package (the CLI's display), never imported here.
        self.batch_progress: ProgressFactory | None = None
        self._lock = threading.Lock()

    def resolve_backend(self, backend: Backend | None) -> Backend:
        """The given backend, else the default one; with none set, the registered default
        backend (the embedded engine on the default model) is started once (SGLang would fail
        here instead)."""
        if backend is not None:
            return getattr(backend, "endpoint", backend)
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


global_config = GlobalConfig()
