"""The call cache's file: one SQLite database (WAL), shared by threads and processes.

Why SQLite: one file that several processes may read and write at once without corrupting it
(WAL readers never wait for the writer), crash-safe commits, and no server to run. Each entry
is ``key -> value`` (a 16-byte digest and an encoded answer, see ``call_cache``) with the times
it was made and last used, so the file can be bounded by size, least recently used first.

Reads run on the caller's thread, on one shared connection; on a hub, the keys of all the
programs waiting go as one query (about 3 µs a key when measured alone). Writes go to one
writer thread per process that commits whatever is queued in one transaction, so a run never
waits for the disk and a finished call is on disk a few milliseconds later (a process killed
after that loses nothing). A cache that cannot be opened or written (corrupt, locked, not a
cache, disk full) never fails a run: it warns once and the run goes on uncached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sglrun.lang.hub import current_hub

__all__ = [
    "APPLICATION_ID",
    "DEFAULT_MAX_BYTES",
    "FILE_NAME",
    "CacheStats",
    "CacheStore",
    "cache_file",
    "default_cache_dir",
]

logger = logging.getLogger("sglrun.cache")

APPLICATION_ID = 0x53474C52  # "SGLR" in the SQLite header: this file is an sglrun cache
SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: millions of short calls
FILE_NAME = "calls.sqlite"
OPEN_TIMEOUT = 2.0  # seconds a read waits for a lock before the cache gives up (a run must go on)
WRITE_TIMEOUT = 10.0  # seconds the writer waits for another process's write to end
TOUCH_AFTER = 3600  # a hit refreshes its entry's last use only when older than this (s)
QUEUE_LIMIT = 100_000  # writes queued beyond this are dropped (the disk cannot keep up)
COMMIT_EVERY = 0.05  # seconds the writer gathers entries before a commit (one per batch)
COMMIT_SIZE = 512  # or this many entries, whichever comes first
ROWS_PER_STATEMENT = 200  # entries one INSERT writes (SQLite takes up to 32,766 values)
SIZE_CHECK_EVERY = 1000  # entries written between checks of the file against its bound
PRUNE_TO = 0.9  # an over-size file is pruned to this share of its bound
WAL_LIMIT = 1 << 20  # bytes the write-ahead log keeps after a checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key BLOB PRIMARY KEY, value BLOB NOT NULL, created INTEGER NOT NULL, used INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, digest TEXT NOT NULL
) WITHOUT ROWID;
"""


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """The user cache directory: ``$XDG_CACHE_HOME/sglrun`` (else ``~/.cache/sglrun``) on
    Linux, ``~/Library/Caches/sglrun`` on macOS, ``%LOCALAPPDATA%\\sglrun\\Cache`` on
    Windows."""
    env = dict(os.environ) if env is None else env
    if os.name == "nt" and env.get("LOCALAPPDATA"):
        return Path(env["LOCALAPPDATA"]) / "sglrun" / "Cache"
    if os.uname().sysname == "Darwin":
        return Path.home() / "Library" / "Caches" / "sglrun"
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sglrun"


def cache_file(path: str | os.PathLike[str] | None) -> Path:
    """The file a cache path names: the default one for None, ``calls.sqlite`` in a
    directory."""
    file = Path(path).expanduser() if path is not None else default_cache_dir() / FILE_NAME
    return file / FILE_NAME if file.is_dir() else file


@dataclasses.dataclass
class CacheStats:
    """``sglrun cache stats``: what the file holds and what it saved, all runs together."""

    path: str
    entries: int
    bytes: int  # the database and its write-ahead log on disk
    max_bytes: int
    hits: int
    misses: int
    tokens_saved: int
    oldest_use: float | None  # the least recently used entry's last use (epoch seconds)
    newest_use: float | None


class NotACache(Exception):  # noqa: N818 - internal: why the file cannot be used
    """The file exists and is not an sglrun cache (or has a schema this version cannot read)."""


class CacheStore:
    """One cache file. ``get`` and ``put`` never raise: on a broken file they warn once
    (``on_warning``) and the store turns itself off (``broken`` says why)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.path = cache_file(path)
        self.max_bytes = max_bytes
        self.on_warning = on_warning
        self.broken: str | None = None
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: list[tuple[str, Any]] = []
        self._pending: dict[bytes, bytes] = {}  # queued, not yet committed: still hits
        self._writing = False
        self._flushing = 0  # callers waiting in flush: commit at once
        self._writer: threading.Thread | None = None
        self._closed = False
        self._written_since_check = 0
        self.counts = {"hits": 0, "misses": 0, "tokens_saved": 0}  # not yet on disk
        self._reader: sqlite3.Connection | None = None
        try:
            self._reader = self._connect(OPEN_TIMEOUT)
            self._prepare(self._reader)
        except (sqlite3.Error, OSError, NotACache) as exc:
            self._break(exc)

    # ------------------------------------------------------------------ opening
    def _connect(self, timeout: float) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable against a process crash
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")  # the log shrinks back after use
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check that the file is ours (never turn a user's file into a cache), then make
        the schema once."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id == APPLICATION_ID:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise NotACache(f"it is a cache of another sglrun version (schema {version})")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        if app_id != 0 or _has_tables(conn):
            raise NotACache("it is a SQLite database, but not an sglrun cache")
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # pruned pages can go back to the disk
        conn.execute("BEGIN IMMEDIATE")  # two processes may create it at once: check again
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                if _has_tables(conn):
                    raise NotACache("it is a SQLite database, but not an sglrun cache")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("PRAGMA journal_mode=WAL")

    def _break(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, sqlite3.DatabaseError) and "not a database" in reason:
            reason = "it is not a SQLite database (nothing was written to it)"
        self.broken = reason
        message = f"call cache {self.path}: {reason}; running without the cache"
        (self.on_warning or logger.warning)(message)

    @property
    def enabled(self) -> bool:
        return self.broken is None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ entries
    # A batcher for ``Hub.gather``: the lookups of a hub's programs go as one query per
    # round. One query per lookup would let go of the GIL each time, and on the I/O thread's
    # hub every such handover to another thread costs far more than the lookup (measured:
    # a cached rerun ran at a third of the speed, and an uncached run coalesced 10x less).
    max_batch = 256
    max_in_flight = 1
    cooperative = True
    send_when_idle = True  # a lookup is local: gather every runnable program's first

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None (also when the cache is broken); on a
        hub, gathered with the other programs' lookups."""
        if self.broken is not None or self._reader is None:
            return None
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        hub = current_hub()
        if hub is None:
            return self.get_many([key]).get(key)
        found: list[bytes | None] = hub.gather(self, [key])
        return found[0]

    def send_together(self, groups: Sequence[list[Any]]) -> list[Any]:
        found = self.get_many([group[0] for group in groups])
        return [[found.get(group[0])] for group in groups]

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The values stored under ``keys`` (those found), in one query of one row."""
        if self.broken is not None or self._reader is None:
            return {}
        # One aggregate row, not a row per key: sqlite3 lets go of the GIL for every row it
        # steps to, and in a busy process taking it back costs more than the lookup (measured
        # on a fully cached rerun of 20,000 rows: 0.61 s in this query before, 0.46 s after).
        marks = ",".join("?" * len(keys))
        sql = (
            "SELECT group_concat(hex(key) || ' ' || hex(value) || ' ' || used, ' ') "
            f"FROM calls WHERE key IN ({marks})"
        )
        try:
            with self._read_lock:
                row = self._reader.execute(sql, keys).fetchone()
        except sqlite3.Error as exc:
            self._break(exc)
            return {}
        found: dict[bytes, bytes] = {}
        fields = row[0].split(" ") if row and row[0] else []
        stale = time.time() - TOUCH_AFTER
        for at in range(0, len(fields) - 2, 3):
            key = bytes.fromhex(fields[at])
            found[key] = bytes.fromhex(fields[at + 1])
            if int(fields[at + 2]) < stale:
                self._enqueue("touch", key)
        return found

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` (in the background: committed a few milliseconds later)."""
        if self.broken is None and not self._closed:
            self._pending[key] = value
            self._enqueue("put", (key, value))

    def count(self, *, hits: int = 0, misses: int = 0, tokens_saved: int = 0) -> None:
        """Add to the all-time counters ``stats`` reports (written with the next commit)."""
        with self._cond:
            self.counts["hits"] += hits
            self.counts["misses"] += misses
            self.counts["tokens_saved"] += tokens_saved

    def _enqueue(self, kind: str, item: Any) -> None:
        with self._cond:
            queue = self._queue
            if len(queue) >= QUEUE_LIMIT:
                return  # the disk is far behind: an entry less is only a later miss
            queue.append((kind, item))
            if self._writer is None:
                self._start_writer()
            if len(queue) == 1 or len(queue) >= COMMIT_SIZE:
                self._cond.notify()  # the writer sleeps until the first entry, then gathers

    def _start_writer(self) -> None:
        self._writer = threading.Thread(
            target=self._write_loop, name="sglrun-cache-writer", daemon=True
        )
        self._writer.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued is committed (or the cache broke); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
        try:
            return self._wait_written(deadline)
        finally:
            with self._cond:
                self._flushing -= 1

    def _wait_written(self, deadline: float) -> bool:
        with self._cond:
            if any(self.counts.values()) and self.broken is None:
                self._queue.append(("counts", None))
                self._cond.notify()
                if self._writer is None:
                    self._start_writer()
            while (self._queue or self._writing) and self.broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the file."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=5.0)
        if self._reader is not None:
            with self._read_lock:
                self._reader.close()
            self._reader = None

    # ------------------------------------------------------------------ the writer
    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    break
                # Gather for a moment: a commit per entry would take the GIL from the
                # programs hundreds of times a second.
                deadline = time.monotonic() + COMMIT_EVERY
                while len(self._queue) < COMMIT_SIZE and not self._closed and not self._flushing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                counts, self.counts = self.counts, {"hits": 0, "misses": 0, "tokens_saved": 0}
                self._writing = True
            try:
                if conn is None:
                    conn = self._connect(WRITE_TIMEOUT)
                self._commit(conn, batch, counts)
            except (sqlite3.Error, OSError) as exc:
                self._break(exc)
            finally:
                with self._cond:
                    for kind, item in batch:
                        if kind == "put" and self._pending.get(item[0]) is item[1]:
                            del self._pending[item[0]]
                    self._writing = False
                    self._cond.notify_all()
            if self.broken is not None:
                break
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()

    def _commit(
        self, conn: sqlite3.Connection, batch: list[tuple[str, Any]], counts: dict[str, int]
    ) -> None:
        now = int(time.time())
        puts = [(key, value) for kind, (key, value) in _items(batch, "put")]
        touches = [key for kind, key in _items(batch, "touch")]
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Many rows per statement: each statement lets go of the GIL and takes it back,
            # and a row at a time that handover (waiting on the programs' thread) cost more
            # than the writing (measured: a filling batch ran 30% slower than an uncached one).
            for start in range(0, len(puts), ROWS_PER_STATEMENT):
                chunk = puts[start : start + ROWS_PER_STATEMENT]
                values = ",".join(["(?,?,?,?)"] * len(chunk))
                conn.execute(
                    f"INSERT OR REPLACE INTO calls (key, value, created, used) VALUES {values}",
                    [item for key, value in chunk for item in (key, value, now, now)],
                )
            for start in range(0, len(touches), ROWS_PER_STATEMENT):
                chunk = touches[start : start + ROWS_PER_STATEMENT]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"UPDATE calls SET used=? WHERE key IN ({marks})", [now, *chunk])
            for name, value in counts.items():
                if value:
                    conn.execute(
                        "INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (name, value),
                    )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._written_since_check += len(puts)
        if self._written_since_check >= SIZE_CHECK_EVERY:
            self._written_since_check = 0
            if _used_bytes(conn) > self.max_bytes:
                prune_lru(conn, int(self.max_bytes * PRUNE_TO))
                conn.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the log is space too

    # ------------------------------------------------------------------ file digests
    def file_digest(self, path: Path, compute: Callable[[Path], str]) -> str:
        """``compute(path)`` (a content hash), remembered by path, size and mtime so a model
        file is hashed once, not every run."""
        stat = path.stat()
        where = str(path.resolve())
        if self._reader is not None and self.broken is None:
            try:
                with self._read_lock:
                    row = self._reader.execute(
                        "SELECT digest FROM files WHERE path=? AND size=? AND mtime_ns=?",
                        (where, stat.st_size, stat.st_mtime_ns),
                    ).fetchone()
                if row is not None:
                    return str(row[0])
                digest = compute(path)
                with self._read_lock:
                    self._reader.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                        (where, stat.st_size, stat.st_mtime_ns, digest),
                    )
                return digest
            except sqlite3.Error as exc:
                self._break(exc)
        return compute(path)

    # ------------------------------------------------------------------ maintenance
    def stats(self) -> CacheStats:
        """Entries, size and all-time counters (``sglrun cache stats``)."""
        self.flush()
        conn = self._maintenance()
        try:
            entries, oldest, newest = conn.execute(
                "SELECT count(*), min(used), max(used) FROM calls"
            ).fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        finally:
            conn.close()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return CacheStats(
            path=str(self.path),
            entries=int(entries),
            bytes=size,
            max_bytes=self.max_bytes,
            hits=int(counters.get("hits", 0)),
            misses=int(counters.get("misses", 0)),
            tokens_saved=int(counters.get("tokens_saved", 0)),
            oldest_use=float(oldest) if oldest is not None else None,
            newest_use=float(newest) if newest is not None else None,
        )

    def clear(self) -> int:
        """Remove every entry and the counters; returns how many entries went."""
        return self._delete("DELETE FROM calls", (), counters=True)

    def prune(self, *, older_than: float | None = None, max_bytes: int | None = None) -> int:
        """Remove entries not used for ``older_than`` seconds, then the least recently used
        until the file fits ``max_bytes``; returns how many went."""
        removed = 0
        if older_than is not None:
            cutoff = int(time.time() - older_than)
            removed += self._delete("DELETE FROM calls WHERE used < ?", (cutoff,))
        if max_bytes is not None:
            conn = self._maintenance()
            try:
                removed += prune_lru(conn, max_bytes)
                conn.execute("VACUUM")
            finally:
                conn.close()
        return removed

    def _maintenance(self) -> sqlite3.Connection:
        """A connection of its own for the commands (raises: they report the error)."""
        if self.broken is not None:
            raise sqlite3.DatabaseError(self.broken)
        return self._connect(WRITE_TIMEOUT)

    def _delete(self, sql: str, args: tuple[Any, ...], *, counters: bool = False) -> int:
        self.flush()
        conn = self._maintenance()
        try:
            conn.execute("BEGIN IMMEDIATE")
            removed = conn.execute(sql, args).rowcount
            if counters:
                conn.execute("DELETE FROM counters")
            conn.execute("COMMIT")
            conn.execute("VACUUM")  # give the space back
        finally:
            conn.close()
        self._pending.clear()
        return int(removed)


def _has_tables(conn: sqlite3.Connection) -> bool:
    return bool(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])


def _items(batch: list[tuple[str, Any]], kind: str) -> list[tuple[str, Any]]:
    return [entry for entry in batch if entry[0] == kind]


def _used_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def prune_lru(conn: sqlite3.Connection, max_bytes: int) -> int:
    """Delete the least recently used entries until the used pages fit ``max_bytes``."""
    used = _used_bytes(conn)
    if used <= max_bytes:
        return 0
    entries = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    if not entries:
        return 0
    drop = max(1, int(entries * (1 - max_bytes / used)) + 1)
    conn.execute("BEGIN IMMEDIATE")
    try:
        removed = conn.execute(
            "DELETE FROM calls WHERE key IN (SELECT key FROM calls ORDER BY used LIMIT ?)",
            (drop,),
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(removed)
