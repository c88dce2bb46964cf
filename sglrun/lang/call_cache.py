"""The call cache: each model call is paid once, and a rerun replays it.

Every ``gen`` and ``select`` is cached under a digest of what determines its answer: the
backend's identity (``Backend.cache_identity``: its kind and model, a model file by its
content), the rendered request (prompt or messages, role text, images' bytes), every sampling
parameter, the constraint and ``n``. A program edited in step 3 therefore replays steps 1 and
2 from the cache and only sends what changed; a row killed half-way replays its finished
calls. API keys are never part of an identity.

A sampled call (temperature > 0) is cached too: a rerun replays the same sample. Identical
sampled requests in one run (``fork(5)`` over the same prompt, or five identical rows) are
told apart by their order of arrival, so each keeps its own sample instead of all replaying
one. ``mode="refresh"`` sends every call again and stores the new answers.

A ``CallCache`` is one run's view of a ``CacheStore`` (the SQLite file): it counts that run's
hits and the tokens they saved. ``run(cache=...)``, ``run_batch(cache=...)``,
``sgl.set_cache(...)`` and ``sglrun batch`` (on by default) make one.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import operator
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from sglrun.errors import InvalidArgumentError
from sglrun.lang.backend import GenerateRequest, GenerateResult, SelectRequest
from sglrun.lang.cache_store import (
    DEFAULT_MAX_BYTES,
    CacheStore,
    cache_file,
)
from sglrun.lang.choices import ChoicesDecision
from sglrun.lang.ir import SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend, ChunkCallback

__all__ = [
    "CACHE_MODES",
    "CallCache",
    "close_stores",
    "open_store",
    "parse_size",
    "release_store",
    "resolve_cache",
]

CACHE_MODES = ("use", "refresh", "off")
# Part of every key, so a new encoding never reads an old entry: the sampling parameters go
# in as their values in field order (a third of the cost of encoding them by name).
SAMPLING_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
KEY_VERSION = ("sglrun-call-1:" + ",".join(SAMPLING_FIELDS)).encode()
_sampling_values = operator.attrgetter(*SAMPLING_FIELDS)
UNCACHED_META = ("e2e_latency", "cached")  # meta that describes this call, not its answer

R = TypeVar("R")

_UNKNOWN = object()
_stores: dict[Path, CacheStore] = {}  # one store per file in a process: one writer each
_stores_lock = threading.Lock()


def open_store(
    path: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> CacheStore:
    """The process's store for ``path`` (default: the user cache directory), opened once."""
    where = cache_file(path).absolute()
    with _stores_lock:
        store = _stores.get(where)
        if not _stores:
            atexit.register(close_stores)  # what is queued is committed at a normal exit
        if store is None or store.closed:  # a broken one stays: it warned once already
            store = CacheStore(
                where, max_bytes=max_bytes or DEFAULT_MAX_BYTES, on_warning=on_warning
            )
            _stores[where] = store
        elif max_bytes is not None:
            store.max_bytes = max_bytes
        if on_warning is not None:
            store.on_warning = on_warning
        return store


def release_store(store: CacheStore) -> None:
    """Commit and close ``store`` and forget it (a command is done with it)."""
    with _stores_lock:
        for path, known in list(_stores.items()):
            if known is store:
                del _stores[path]
    store.close()


def close_stores() -> None:
    """Commit and close every store this process opened (at exit)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


def parse_size(value: int | str) -> int:
    """``500MB``, ``2GB``, ``1GiB`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        for suffix, scale in (("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30),
                              ("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("B", 1)):  # fmt: skip
            if text.endswith(suffix):
                text, factor = text[: -len(suffix)], scale
                break
        else:
            factor = 1
        try:
            number = float(text)
        except ValueError:
            number = 0.0
        if number > 0:
            return int(number * factor)
    raise InvalidArgumentError(
        f"a cache size must be like 500MB, 2GB or a byte count, not {value!r}"
    )


class CallCache:
    """One run's use of a cache file: looks calls up, stores answers, counts hits."""

    def __init__(
        self, store: CacheStore, mode: str = "use", *, parent: CallCache | None = None
    ) -> None:
        if mode not in ("use", "refresh"):
            raise InvalidArgumentError(f"cache mode must be 'use' or 'refresh', not {mode!r}")
        self.store = store
        self.mode = mode
        self.parent = parent  # a run's cache counts into the cache it was made from
        self.hits = 0
        self.misses = 0
        self.tokens_saved = 0
        self._reported = (0, 0, 0)  # what ``finish`` has passed on so far
        self._lock = threading.Lock()
        self._seen: set[int] = set()  # sampled request digests of this run (first 8 bytes)
        self._repeats: dict[int, int] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        mode: str = "use",
        max_size: int | str | None = None,
    ) -> CallCache:
        """A run's cache on ``path`` (default: the user cache directory)."""
        max_bytes = parse_size(max_size) if max_size is not None else None
        return cls(open_store(path, max_bytes=max_bytes), mode)

    def fresh(self) -> CallCache:
        """The same file and mode for one run: its own counters (also added to this one's)
        and its own order of identical sampled requests."""
        return CallCache(self.store, self.mode, parent=self)

    def __repr__(self) -> str:
        return f"CallCache({str(self.store.path)!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ calls
    def call(
        self,
        backend: Backend,
        request: GenerateRequest | SelectRequest,
        send: Callable[[], R],
        on_chunk: ChunkCallback | None = None,
    ) -> R:
        """The answer to ``request``: replayed from the file, else ``send()`` and stored."""
        store = self.store
        key = self._key(backend, request) if store.enabled else None
        if key is None:
            return send()
        if self.mode == "use":
            found = store.lookup(key)
            if found is not None:
                replayed = _decode(found, request)
                if replayed is not None:
                    self._hit(replayed)
                    if on_chunk is not None and isinstance(replayed, GenerateResult):
                        text = replayed.text
                        on_chunk(text if isinstance(text, str) else "", replayed.meta_info)
                    return replayed  # type: ignore[no-any-return]
        result = send()
        with self._lock:
            self.misses += 1
        encoded = _encode(result)
        if encoded is not None:
            store.put(key, encoded)
        return result

    def _hit(self, result: GenerateResult | Any) -> None:
        saved = _tokens(result.meta_info)
        with self._lock:
            self.hits += 1
            self.tokens_saved += saved

    def finish(self) -> None:
        """The run is over: add its counts to the cache it was made from and to the file's
        all-time counters (once; a later call adds only what came since)."""
        with self._lock:
            counts = (self.hits - self._reported[0], self.misses - self._reported[1],
                      self.tokens_saved - self._reported[2])  # fmt: skip
            self._reported = (self.hits, self.misses, self.tokens_saved)
        if not any(counts):
            return
        if self.parent is not None:
            with self.parent._lock:
                self.parent.hits += counts[0]
                self.parent.misses += counts[1]
                self.parent.tokens_saved += counts[2]
        self.store.count(hits=counts[0], misses=counts[1], tokens_saved=counts[2])

    # ------------------------------------------------------------------ keys
    def identity(self, backend: Backend) -> bytes | None:
        """The backend's identity, encoded once per backend (None: never cached)."""
        memo = getattr(backend, "__dict__", {})
        found = memo.get("_sglrun_cache_identity", _UNKNOWN)
        if found is not _UNKNOWN:
            return found  # type: ignore[no-any-return]
        described = backend.cache_identity()
        encoded = None
        if described is not None:
            resolved = {
                name: self.store.file_digest(value, _file_sha256)
                if isinstance(value, Path)
                else value
                for name, value in described.items()
            }
            encoded = orjson.dumps(resolved, option=orjson.OPT_SORT_KEYS, default=str)
        if isinstance(memo, dict):
            memo["_sglrun_cache_identity"] = encoded
        return encoded

    def _key(self, backend: Backend, request: GenerateRequest | SelectRequest) -> bytes | None:
        identity = self.identity(backend)
        if identity is None:
            return None
        images = [(image.mime_type, image.base64_data) for image in request.images]
        if isinstance(request, GenerateRequest):
            params = request.params
            body: tuple[Any, ...] = ("gen", request.prompt, _sampling_values(params),
                                     request.messages, request.role, request.role_text,
                                     images)  # fmt: skip
            sampled = (params.temperature or 0.0) > 0
        else:
            method = request.choices_method
            state = getattr(method, "__dict__", {})
            described = (type(method).__module__, type(method).__qualname__, state)
            body = ("select", request.prompt, request.choices, request.temperature, described,
                    request.messages, request.role, request.role_text, images)  # fmt: skip
            sampled = request.temperature > 0
        try:
            encoded = orjson.dumps(body, default=str)
        except (TypeError, orjson.JSONEncodeError):
            return None
        digest = hashlib.blake2b(KEY_VERSION, digest_size=16)
        digest.update(identity)
        digest.update(encoded)
        key = digest.digest()
        if sampled:  # the nth identical sampled request of this run keeps the nth sample
            nth = self._occurrence(key)
            if nth:
                key = hashlib.blake2b(key + nth.to_bytes(8, "little"), digest_size=16).digest()
        return key

    def _occurrence(self, key: bytes) -> int:
        short = int.from_bytes(key[:8], "little")
        with self._lock:
            if short not in self._seen:
                self._seen.add(short)
                return 0
            nth = self._repeats.get(short, 0) + 1
            self._repeats[short] = nth
            return nth


def resolve_cache(cache: Any, default: CallCache | None) -> CallCache | None:
    """A run's cache from what ``run(cache=...)`` was given: a ``CallCache`` (its file and
    mode), a path, True (the user cache directory), False (none), or None: the cache of the
    program running this one (a nested program is part of its run), else ``default``
    (``sgl.set_cache``)."""
    if cache is None:
        import greenlet

        inherited: CallCache | None = getattr(greenlet.getcurrent(), "call_cache", None)
        if inherited is not None:
            return inherited
        return default.fresh() if default is not None else None
    if cache is False:
        return None
    if isinstance(cache, CallCache):
        return cache.fresh()
    if cache is True:
        return CallCache.open().fresh()
    if isinstance(cache, (str, os.PathLike)):
        return CallCache.open(cache).fresh()
    raise InvalidArgumentError(
        f"cache must be a path, True, False, None or a CallCache, not {type(cache).__name__}"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _encode(result: Any) -> bytes | None:
    """An answer as JSON bytes; None when its meta is no JSON (then it is simply not cached).
    orjson writes -inf (a select's score of an impossible choice) as null, so an answer with a
    non-finite number is written by the stdlib instead, after a ``~``."""
    meta = result.meta_info
    if meta and ("e2e_latency" in meta or "cached" in meta):
        meta = {k: v for k, v in meta.items() if k not in UNCACHED_META}
    if isinstance(result, GenerateResult):
        entry: dict[str, Any] = {"t": result.text, "m": meta or {}}
    else:
        entry = {"d": result.decision, "m": meta or {}}
    try:
        encoded = orjson.dumps(entry)
    except TypeError:
        return None
    if b"null" in encoded and _has_non_finite(entry):
        try:
            return b"~" + json.dumps(entry, separators=(",", ":")).encode()
        except (TypeError, ValueError):
            return None
    return encoded


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(item) for item in value)
    return False


def _decode(value: bytes, request: GenerateRequest | SelectRequest) -> Any:
    try:
        entry = json.loads(value[1:]) if value[:1] == b"~" else orjson.loads(value)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    meta = entry.get("m") or {}
    meta["cached"] = True
    if isinstance(request, GenerateRequest):
        text = entry.get("t")
        if not isinstance(text, (str, list)):
            return None
        return GenerateResult(text=text, meta_info=meta)
    decision = entry.get("d")
    if not isinstance(decision, str):
        return None
    return ChoicesDecision(decision=decision, meta_info=meta)


def _tokens(meta: dict[str, Any] | None) -> int:
    total = 0
    for name in ("prompt_tokens", "completion_tokens"):
        value = (meta or {}).get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            total += value
        elif isinstance(value, list):
            total += sum(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return total
