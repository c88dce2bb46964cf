"""``run_dataset``: a program as one stage of a Ray Data pipeline of one's own.

Columns in (a row fills the program's parameters by name, as a JSONL row does), the program's
variables plus ``error`` out. Each actor of the pool builds its backend once and runs its
batches through the local runner: many programs in flight per actor, and a row that fails is
a row with an ``error``, never a failed batch. Nothing runs until the dataset is consumed.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sglrun.batch.readers import Row, row_digest
from sglrun.batch.render import arrow_table, records_table
from sglrun.batch.runner import run_batch_file
from sglrun.errors import InvalidArgumentError
from sglrun.ray.worker import WorkerParts, close_parts

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.function import SglFunction

__all__ = ["run_dataset"]


def _build_backend(backend: str | Callable[[], Backend], options: dict[str, Any]) -> Backend:
    if callable(backend):
        return backend()
    from sglrun.lang.registry import BackendOptions, backend_entry

    urls = options.pop("url", None) or options.pop("urls", ())
    urls = (urls,) if isinstance(urls, str) else tuple(urls)
    return backend_entry(backend).factory(BackendOptions(urls=urls, **options))


@dataclass(frozen=True)
class _Setup:
    """What each actor builds (picklable: it travels to the workers)."""

    program: SglFunction
    backend: Any  # a registered backend's name, or a function that builds a Backend
    backend_options: dict[str, Any]
    concurrency: int | str
    sampling: dict[str, Any]
    cache: str | None

    def __call__(self) -> WorkerParts:
        from sglrun.lang.call_cache import CallCache, open_store
        from sglrun.lang.ir import SamplingParams
        from sglrun.lang.scheduler import auto_concurrency

        backend = _build_backend(self.backend, dict(self.backend_options))
        cache = None
        if self.cache is not None:
            store = open_store(self.cache)
            cache = CallCache(store) if store.enabled else None
        threads = self.concurrency
        return WorkerParts(
            program=self.program, backend=backend,
            defaults=SamplingParams.defaults(**self.sampling),
            concurrency=auto_concurrency(backend) if threads == "auto" else int(threads),
            cache=cache,
        )  # fmt: skip


class _ProgramStage:
    """The map_batches UDF: an Arrow table of rows in, a table of variables and errors out."""

    def __init__(self, setup: _Setup, keep: tuple[str, ...]) -> None:
        self.parts = setup()
        self.keep = keep

    def __call__(self, table: Any) -> Any:
        data = table.to_pylist()
        rows = [Row(i, i + 1, str(i), item, None, row_digest(item)) for i, item in enumerate(data)]
        records: list[dict[str, Any]] = []
        parts = self.parts
        run_batch_file(
            parts.program, rows, backend=parts.backend, defaults=parts.defaults,
            num_threads=parts.concurrency, on_record=records.append, grace=0.0,
            cache=parts.cache,
        )  # fmt: skip
        header, table = records_table(records, [])  # as the Parquet parts: id, vars, error
        header = [*self.keep, *header[1:]]  # the row's own number is no id of the user's
        table = [[item.get(c) for c in self.keep] + row[1:] for item, row in zip(data, table)]
        return arrow_table(header, table)

    def __del__(self) -> None:
        close_parts(getattr(self, "parts", None))


def _pickle_by_value(program: SglFunction) -> None:
    """A program from a file loaded by path (a module no worker can import by its name)
    travels by value, so the workers need not have the file."""
    module_name = getattr(program.func, "__module__", None)
    module = sys.modules.get(module_name or "")
    if module is None or module_name == "__main__":
        return
    try:
        importable = importlib.util.find_spec(module_name or "") is not None
    except (ImportError, ValueError):
        importable = False
    if not importable:
        import ray.cloudpickle as cloudpickle

        cloudpickle.register_pickle_by_value(module)


def run_dataset(
    dataset: Any,
    program: SglFunction,
    *,
    backend: str | Callable[[], Backend] = "local",
    backend_options: dict[str, Any] | None = None,
    workers: int | tuple[int, int] = 1,
    concurrency: int | str = "auto",
    rows_per_batch: int = 256,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    keep: Sequence[str] = (),
    cache: str | None = None,
    **sampling: Any,
) -> Any:
    """``dataset`` through ``program``: a lazy ``ray.data.Dataset`` of its variables and
    ``error`` (plus the ``keep`` columns of the input).

    ``backend`` is a registered backend's name (``"local"``, ``"sglang"``, ``"openai"``...,
    with ``backend_options`` such as ``{"url": ..., "model": ...}``) or a function that
    builds one in each worker (``lambda: sgl.RuntimeEndpoint(url)``); a backend object
    itself holds connections or a model and cannot travel. ``workers`` is the actor pool's
    size (or ``(min, max)``), ``concurrency`` the programs in flight per actor, ``cache``
    the path of a call cache file every worker shares, ``sampling`` the defaults of
    ``run_batch`` (``temperature=``, ``max_new_tokens=``...).
    """
    from ray.data import ActorPoolStrategy

    from sglrun.lang.backend import Backend as BackendType
    from sglrun.lang.sampling import check_sampling

    if isinstance(backend, BackendType):
        raise InvalidArgumentError(
            "run_dataset: pass the backend's name or a function that builds it "
            "(backend=lambda: sgl.RuntimeEndpoint(url)): each worker builds its own"
        )
    if not isinstance(backend, str) and not callable(backend):
        raise InvalidArgumentError(f"run_dataset: backend must be a name or a function, not "
                                   f"{type(backend).__name__}")  # fmt: skip
    low, high = (workers, workers) if isinstance(workers, int) else workers
    if not 1 <= low <= high:
        raise InvalidArgumentError(f"run_dataset: workers must be >= 1 (min <= max), not "
                                   f"{workers!r}")  # fmt: skip
    if rows_per_batch < 1:
        raise InvalidArgumentError(f"run_dataset: rows_per_batch must be >= 1, not "
                                   f"{rows_per_batch!r}")  # fmt: skip
    check_sampling("run_dataset", sampling)
    _pickle_by_value(program)
    setup = _Setup(program, backend, dict(backend_options or {}), concurrency, sampling, cache)
    return dataset.map_batches(
        _ProgramStage, batch_size=rows_per_batch, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs={"setup": setup, "keep": tuple(keep)},
    )  # fmt: skip
