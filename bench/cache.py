"""(10) The call cache: what a rerun costs once every call is cached, and what an entry weighs.

``sglrun batch`` of the reference program (three calls a row) as a user runs it: once with
``--no-cache``, once filling a fresh cache file, once again on that file (every call a hit).
Wall time of the whole process, start-up included. The same batch on the in-process fake
backend with no cache is the floor: the runtime and the batch machinery with no model at all,
which no replay can beat. Then the same fill and rerun against the latency server (lognormal,
median 50 ms, sigma 1), where the model's time is what the cache saves.

Size per call: the database file (checkpointed, so the write-ahead log is in it) over the
entries it holds.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING

from bench.util import BIN, ROOT, write_rows

if TYPE_CHECKING:
    from bench.run import Bench

RERUN_TARGET = 3.0
SIZE_TARGET = 1024
FAKE_REPLIES = '[" an answer"]'


def _batch(rows: str, out: str, url: str | None, *extra: str) -> tuple[float, str]:
    """Wall seconds of one ``sglrun batch``, and its stderr (raises when it fails)."""
    backend = ["--backend", "sglang", "--url", url] if url else ["--backend", "fake"]
    command = [os.path.join(BIN, "sglrun"), "batch", os.path.join("bench", "programs.py"), rows,
               "-o", out, "--overwrite", "-q", *backend, *extra]  # fmt: skip
    env = {**os.environ, "SGLRUN_FAKE_REPLIES": FAKE_REPLIES}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sglrun batch failed ({done.returncode}): {done.stderr[-300:]}")
    return seconds, done.stderr


def _per_call(path: str) -> tuple[float, int]:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        entries = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    return os.path.getsize(path) / max(1, entries), entries


def measure(bench: Bench) -> None:
    from bench.server import ServerProcess

    size = bench.s.cache_rows
    with tempfile.TemporaryDirectory(prefix="sglrun-bench-cache-") as tmp:
        rows = os.path.join(tmp, "rows.jsonl")
        out = os.path.join(tmp, "out.jsonl")
        cache = os.path.join(tmp, "calls.sqlite")
        write_rows(rows, size)
        with ServerProcess() as server:
            _batch(rows, out, server.url, "--no-cache", "--limit", str(bench.s.warmup))
            uncached, _ = _batch(rows, out, server.url, "--no-cache")
            fill, _ = _batch(rows, out, server.url, "--cache", cache)
            server.reset()
            rerun, err = _batch(rows, out, server.url, "--cache", cache)
            sent = server.stats()["requests"]
        floor, _ = _batch(rows, out, None, "--no-cache")
        per_call, entries = _per_call(cache)

        base = size / uncached
        row = bench.row("cache_uncached", n=f"{size:,}")
        row.result = f"{base:,.0f} rows/s ({uncached:.1f} s, start-up included)"
        row.reference = "3 calls a row, each sent to the server"
        row.status = "—"
        row = bench.row("cache_fill", n=f"{size:,}")
        row.result = f"{size / fill:,.0f} rows/s ({fill:.1f} s)"
        row.reference = f"{entries:,} entries written"
        row.ratio = f"{uncached / fill:.2f}"
        row.status = "—"
        row = bench.row("cache_rerun", n=f"{size:,}")
        hits = "every call from the cache" if sent <= 3 else f"{sent} requests sent"
        row.result = f"{size / rerun:,.0f} rows/s ({rerun:.1f} s); {hits}"
        row.reference = f"uncached {base:,.0f} rows/s; floor {size / floor:,.0f} rows/s (below)"
        row.ratio = f"{uncached / rerun:.2f}"
        row.target = f">= {RERUN_TARGET:g}x the uncached run"
        row.status = "PASS" if uncached / rerun >= RERUN_TARGET and sent <= 3 else "FAIL"
        row.values = {"rerun_ratio": uncached / rerun, "requests": sent,
                      "ceiling_ratio": uncached / floor}  # fmt: skip
        row = bench.row("cache_floor", n=f"{size:,}")
        row.result = f"{size / floor:,.0f} rows/s ({floor:.1f} s)"
        row.reference = (
            f"no model call at all: the most a replay could reach, {uncached / floor:.2f}x "
            "the uncached run"
        )
        row.ratio = f"{floor / rerun:.2f}"
        row.status = "—"
        row = bench.row("cache_size")
        row.result = f"{per_call:,.0f} bytes per cached call"
        row.reference = f"{entries:,} entries, {os.path.getsize(cache) / 1e6:.1f} MB"
        row.target = f"< {SIZE_TARGET:,} bytes"
        row.status = "PASS" if per_call < SIZE_TARGET else "FAIL"
        bench.log(
            f"    cache: rerun {size / rerun:,.0f} rows/s vs uncached {base:,.0f}: {err[-160:]}"
        )

        latency_rows = bench.s.cache_latency_rows
        slow_rows = os.path.join(tmp, "slow.jsonl")
        slow_cache = os.path.join(tmp, "slow.sqlite")
        write_rows(slow_rows, latency_rows)
        with ServerProcess(latency_median_ms=50.0, latency_sigma=1.0, seed=11) as server:
            first, _ = _batch(slow_rows, out, server.url, "--cache", slow_cache)
            again, _ = _batch(slow_rows, out, server.url, "--cache", slow_cache)
        row = bench.row("cache_latency", n=f"{latency_rows:,}")
        row.result = f"rerun {latency_rows / again:,.0f} rows/s ({again:.1f} s)"
        row.reference = f"first run {latency_rows / first:,.0f} rows/s ({first:.1f} s)"
        row.ratio = f"{first / again:.1f}"
        row.status = "—"
