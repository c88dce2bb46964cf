"""``python -m bench``: every measurement in one run, one table, written to BENCHMARKS.md.

Parts (each timed, each in its own thread with a time limit, so that neither a failure nor a
hang hides the others; the long RSS part runs last and sizes itself to the time budget):

1. ``fn.run_batch`` of the reference program against the instant server (``RuntimeEndpoint``);
   also on ``FakeBackend`` (no HTTP at all) to show the language runtime's own share;
2. the floor: the same four requests per program by hand (aiohttp tasks; urllib3 threads);
3. peak RSS of ``sglrun batch`` over generated JSONL rows (``os.wait4`` rusage of the child);
4. wall time of ``fork(5)`` + one gen with 200 ms server latency;
5. ``programs/capital_fact.py`` on the embedded SmolLM2 engine vs a hand-written thread pool
   over the same xllamacpp engine;
7. latency-bound batches (``bench/latency.py``); 8. the engine's tokens/s (``bench/engine.py``);
9. regex-constrained decoding against unconstrained, p50/p99 (``bench/constrained.py``);
10. the call cache: a fully cached rerun against the uncached run, and bytes per entry
    (``bench/cache.py``); 11. ``--ray local`` against local mode (``bench/ray_scale.py``);
6. ``sglrun --help`` and ``import sglrun`` start-up time.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import orjson

from bench.report import render_markdown, table
from bench.util import (
    BIN,
    ROOT,
    count_output,
    machine,
    run_with_rusage,
    time_command,
    write_rows,
)

# Stable labels: the smoke test checks that each one is in the table.
LABELS = {
    "batch_small": "(1) run_batch, {n} programs, RuntimeEndpoint",
    "batch_large": "(1) run_batch, {n} programs, RuntimeEndpoint",
    "batch_solo": "(1) run_batch, {n} programs, RuntimeEndpoint(coalesce=False)",
    "batch_fake": "(1b) run_batch, {n} programs, FakeBackend (no HTTP)",
    "floor_aiohttp": "(2) floor: hand-sent requests, {detail}",
    "floor_urllib3": "(2) floor: hand-sent requests, {detail}",
    "rss_small": "(3) sglrun batch peak RSS, {n} rows",
    "rss_medium": "(3) sglrun batch peak RSS, {n} rows",
    "rss_large": "(3) sglrun batch peak RSS, {n} rows",
    "rss_growth": "(3) peak RSS growth per row, {a} -> {b} rows",
    "fork": "(4) fork(5) + gen, 200 ms server latency",
    "capital_sglrun": "(5) capital_fact, {n} rows, run_batch on LlamaCpp",
    "capital_hand": "(5) capital_fact, {n} rows, hand loop on xllamacpp",
    "latency_run_batch_uneven": "(7) run_batch, {n} programs, latency lognormal 50 ms sigma 1.0",
    "latency_batch_ordered_uneven": "(7) sglrun batch, {n} rows, lognormal 50 ms sigma 1.0",
    "latency_batch_unordered_uneven": (
        "(7) sglrun batch --unordered, {n} rows, lognormal 50 ms sigma 1.0"
    ),
    "latency_run_batch_even": "(7) run_batch, {n} programs, latency 50 ms (sigma 0)",
    "latency_batch_ordered_even": "(7) sglrun batch, {n} rows, latency 50 ms (sigma 0)",
    "latency_batch_unordered_even": "(7) sglrun batch --unordered, {n} rows, 50 ms (sigma 0)",
    "engine_sglrun": "(8) sglrun batch on LlamaCpp, {n} rows of bench/generate.py",
    "constrained": "(9) regex-constrained gen on LlamaCpp, ~100 tokens, {n} tries",
    "cache_uncached": "(10) sglrun batch, {n} rows, instant server, --no-cache",
    "cache_fill": "(10) sglrun batch, {n} rows, filling a new cache",
    "cache_rerun": "(10) sglrun batch, {n} rows, rerun fully cached",
    "cache_floor": "(10) floor: sglrun batch, {n} rows, in-process fake backend, no cache",
    "cache_size": "(10) call cache size per entry (reference program)",
    "cache_latency": "(10) rerun fully cached vs first run, {n} rows, lognormal 50 ms sigma 1",
    "ray_overhead": "(11) sglrun batch --ray local, 1 worker: cost per row, {n} rows",
    "ray_startup": "(11) sglrun batch --ray local start-up",
    "ray_scale": "(11) --ray local, 2 workers vs 1, {n} rows, lognormal 50 ms sigma 1",
    "help": "(6) sglrun --help start-up",
    "import": "(6) python -c 'import sglrun'",
}
ROW_KEYS = list(LABELS)


@dataclasses.dataclass
class Settings:
    batch_sizes: tuple[int, int] = (2_000, 20_000)
    fake_size: int = 10_000
    floor_aiohttp: int = 10_000
    floor_urllib3: int = 5_000
    aiohttp_tasks: int = 64
    urllib3_threads: int = 16
    rss_sizes: tuple[int, int, int] = (2_000, 20_000, 200_000)
    fork_runs: int = 5
    capital_rows: int = 64
    capital_threads: int = 64
    capital_rounds: int = 5
    capital_warm: int = 8
    startup_runs: int = 5
    latency_rows: tuple[int, int] = (6_000, 3_000)  # (7) at sigma 1.0 and at sigma 0
    engine_rows: int = 64
    engine_slots: tuple[int, ...] = (8, 16, 32)
    engine_rounds: int = 3
    constrained_tries: int = 30
    cache_rows: int = 20_000
    cache_latency_rows: int = 2_000
    ray_rows: tuple[int, int] = (20_000, 2_000)  # (11) a big and a small run
    ray_latency_rows: int = 4_000
    num_threads: str | int = "auto"
    warmup: int = 200
    quick: bool = False
    part_limit_s: float = 600.0  # with --quick, the limit of every part (else PART_LIMITS)
    budget_s: float = 1000.0  # the whole run; the largest RSS size shrinks to fit (0: no limit)


QUICK = Settings(
    batch_sizes=(200, 1_000),
    fake_size=1_000,
    floor_aiohttp=1_000,
    floor_urllib3=500,
    rss_sizes=(200, 1_000, 2_000),
    fork_runs=2,
    capital_rows=2,
    capital_threads=2,
    capital_rounds=1,
    capital_warm=1,
    startup_runs=3,
    latency_rows=(300, 200),
    engine_rows=8,
    engine_slots=(4,),
    engine_rounds=1,
    constrained_tries=3,
    cache_rows=500,
    cache_latency_rows=100,
    ray_rows=(600, 200),
    ray_latency_rows=200,
    warmup=50,
    quick=True,
    budget_s=0.0,
    part_limit_s=90.0,
)


# Seconds after which a part counts as hung (several times what each takes here).
PART_LIMITS = {
    "6": 120.0, "4": 120.0, "1b": 120.0, "1": 300.0, "7": 600.0, "5": 360.0, "8": 600.0,
    "9": 300.0, "10": 300.0, "11": 600.0, "3": 7200.0,
}  # fmt: skip


@dataclasses.dataclass
class Row:
    key: str
    measurement: str
    result: str = ""
    reference: str = ""
    ratio: str = ""
    target: str = ""
    status: str = ""
    seconds: float | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


class Bench:
    def __init__(self, settings: Settings, log: Callable[[str], None]) -> None:
        self.s = settings
        self.log = log
        self.rows: dict[str, Row] = {}
        self.timings: list[tuple[str, float]] = []
        self.notes: list[str] = []
        self.started = time.perf_counter()
        self.hung = False

    # ------------------------------------------------------------------ helpers
    def row(self, key: str, **fmt: Any) -> Row:
        row = Row(key, LABELS[key].format(**fmt))
        self.rows[key] = row
        return row

    def part(
        self, name: str, keys: list[str], func: Callable[[], None], limit: float = 600.0
    ) -> None:
        """Run one part (in a thread, so a hang cannot stop the others: after ``limit`` seconds
        its rows say ERROR and every thread's stack goes to stderr); on failure its rows say
        ERROR with the reason."""
        self.log(f"--- {name}")
        started = time.perf_counter()
        failures: list[str] = []

        def target() -> None:
            try:
                func()
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:160])
                self.log(traceback.format_exc())

        worker = threading.Thread(target=target, name=f"bench {name}", daemon=True)
        worker.start()
        worker.join(limit)
        reason = failures[0] if failures else None
        if worker.is_alive():
            self.hung = True
            reason = f"hung: no result after {limit:.0f} s (thread dump on stderr)"
            self.log(f"    {name}: {reason}")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if reason:
            for key in keys:
                row = self.rows.get(key) or self.row(key, n="?", detail="?", a="?", b="?")
                if not row.result or row.status == "":
                    row.result = f"error: {reason}"
                    row.status = "ERROR"
        took = time.perf_counter() - started
        self.timings.append((name, took))
        self.log(f"    {name}: {took:.1f} s")

    # ------------------------------------------------------------ (1) and (2)
    def throughput(self) -> None:
        from bench.floor import aiohttp_floor, urllib3_floor
        from bench.programs import make_rows
        from bench.server import ServerProcess

        with ServerProcess() as server:
            self.url = server.url
            # (2) the floor first (fresh process memory), then run_batch.
            questions = [r["question"] for r in make_rows(self.s.floor_aiohttp)]
            aiohttp_floor(server.url, questions[: self.s.warmup], self.s.aiohttp_tasks)
            self._floor("floor_aiohttp", server, lambda: aiohttp_floor(
                server.url, questions, self.s.aiohttp_tasks))  # fmt: skip
            questions = questions[: self.s.floor_urllib3]
            self._floor("floor_urllib3", server, lambda: urllib3_floor(
                server.url, questions, self.s.urllib3_threads))  # fmt: skip

            import sglrun as sgl
            from bench.programs import reference

            # Each request alone (coalesce=False): the path every request takes when the
            # server is slow (a real model), and a reference for the coalescing default.
            solo = sgl.RuntimeEndpoint(server.url, coalesce=False)
            reference.run_batch(
                make_rows(self.s.warmup), backend=solo, num_threads=self.s.num_threads
            )
            self._batch("batch_solo", self.s.batch_sizes[0], solo, server)
            solo.shutdown()
            backend = sgl.RuntimeEndpoint(server.url)
            reference.run_batch(
                make_rows(self.s.warmup), backend=backend, num_threads=self.s.num_threads
            )
            for key, size in zip(("batch_small", "batch_large"), self.s.batch_sizes):
                self._batch(key, size, backend, server)
            backend.shutdown()

    def _floor(self, key: str, server: Any, func: Callable[[], Any]) -> None:
        server.reset()
        server_cpu = server.cpu_seconds()
        started = time.perf_counter()
        result = func()
        took = time.perf_counter() - started
        stats = server.stats()
        server_ms = 1000 * (server.cpu_seconds() - server_cpu) / result.programs
        row = self.row(key, detail=result.name)
        row.values = {"programs_per_s": result.programs_per_s}
        row.result = (
            f"{result.programs_per_s:,.0f} programs/s; "
            f"{result.cpu_ms_per_program:.2f} CPU ms/program"
        )
        row.reference = (
            f"{result.programs:,} programs; {stats['requests'] / result.programs:.2f} HTTP "
            f"requests and {stats['generate_items'] / result.programs:.2f} items per program; "
            f"server {server_ms:.2f} CPU ms/program"
        )
        row.status = "—"
        row.seconds = took
        self.log(f"    {row.measurement}: {row.result} ({row.reference})")

    def _batch(self, key: str, size: int, backend: Any, server: Any) -> None:
        from bench.programs import make_rows, reference

        row = self.row(key, n=f"{size:,}")  # before the run: a hang is reported with its size
        rows = make_rows(size)
        server.reset()
        server_cpu = server.cpu_seconds()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        states = reference.run_batch(rows, backend=backend, num_threads=self.s.num_threads)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        server_ms = 1000 * (server.cpu_seconds() - server_cpu) / size
        stats = server.stats()
        errors = [state.error() for state in states if state.error() is not None]
        verdicts = {state["verdict"] for state in states[:10] if state.error() is None}
        del states
        row.values = {"programs_per_s": size / wall, "cpu_ms": 1000 * cpu / size}
        row.result = f"{size / wall:,.0f} programs/s; {1000 * cpu / size:.2f} CPU ms/program"
        detail = (
            f"{stats['requests'] / size:.2f} HTTP requests and "
            f"{stats['generate_items'] / size:.2f} /generate items per program; "
            f"server {server_ms:.2f} CPU ms/program"
        )
        if errors:
            row.result += f"; {len(errors)} failed ({errors[0]})"
            row.status = "ERROR"
        if not verdicts:
            row.status = "ERROR"
        row.seconds = wall
        floor = self.rows["floor_aiohttp"].values.get("programs_per_s")
        if floor:
            row.reference = f"{floor:,.0f} programs/s (aiohttp floor)"
            row.ratio = f"{size / wall / floor:.2f}"
            if key != "batch_solo" and row.status != "ERROR":
                row.target = ">= 1.5x the floor"
                row.status = "PASS" if size / wall / floor >= 1.5 else "FAIL"
        row.status = row.status or "—"
        self.notes.append(f"{row.measurement}: {detail}.")
        self.log(f"    {row.measurement}: {row.result} ({detail})")

    def fake(self) -> None:
        from bench.programs import make_rows, reference
        from sglrun.backends.fake import FakeBackend

        class _NoRecord(list):  # FakeBackend records every call; keep memory flat
            def append(self, item: Any) -> None:
                pass

        backend = FakeBackend(cycle=True)
        backend.calls = _NoRecord()
        reference.run_batch(make_rows(self.s.warmup), backend=backend)
        size = self.s.fake_size
        rows = make_rows(size)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        states = reference.run_batch(rows, backend=backend, num_threads=self.s.num_threads)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        failed = sum(1 for state in states if state.error() is not None)
        del states
        row = self.row("batch_fake", n=f"{size:,}")
        row.result = f"{size / wall:,.0f} programs/s; {1000 * cpu / size:.2f} CPU ms/program"
        row.reference = "the language runtime alone: no transport"
        row.status = "ERROR" if failed else "—"
        row.seconds = wall

    # ---------------------------------------------------------------- (3) RSS
    def rss(self) -> None:
        from bench.server import ServerProcess

        sizes = list(self.s.rss_sizes)
        keys = ("rss_small", "rss_medium", "rss_large")
        peaks: dict[int, float] = {}  # rows done -> peak RSS (KB)
        rates: list[float] = []
        last = len(sizes) - 1
        with ServerProcess() as server, tempfile.TemporaryDirectory(prefix="sglrun-bench-") as tmp:
            for index, (key, size) in enumerate(zip(keys, sizes)):
                # A run far slower than any seen so far (say, a hang) is stopped, not waited on.
                asked, limit = size, max(120.0, size / 40)
                if self.s.budget_s:
                    left = self.s.budget_s - (time.perf_counter() - self.started) - 8
                    limit = min(limit, left)
                    if left < 20:
                        row = self.row(key, n=f"{asked:,}")
                        row.result = "not run: no time left in the budget"
                        row.status = "SKIPPED"
                        break
                if index == last and self.s.budget_s and rates:
                    # Keep the whole run inside the time budget: at the rate of the largest run
                    # so far, with a margin, run only the rows the time left allows; and stop
                    # the run (keeping its peak RSS so far) if it is slower still.
                    left = self.s.budget_s - (time.perf_counter() - self.started) - 8
                    size = min(size, int(rates[-1] * left * 0.8) // 10_000 * 10_000)
                    limit = max(1.0, left)
                    if size <= sizes[index - 1]:
                        row = self.row(key, n=f"{asked:,}")
                        row.result = "not run: no time left in the budget"
                        row.reference = (
                            f"at {rates[-1]:,.0f} rows/s {asked:,} rows take "
                            f"{asked / rates[-1]:,.0f} s; `--budget 0` runs it anyway"
                        )
                        row.status = "SKIPPED"
                        break
                row = self.row(key, n=f"{size:,}")
                rows_path = os.path.join(tmp, f"rows-{size}.jsonl")
                out_path = os.path.join(tmp, f"out-{size}.jsonl")
                write_rows(rows_path, size)
                command = [
                    os.path.join(BIN, "sglrun"), "batch", os.path.join("bench", "programs.py"),
                    rows_path, "-o", out_path, "--backend", "sglang", "--url", server.url, "-q",
                    "--cache", os.path.join(tmp, f"calls-{size}.sqlite"),  # on, as by default
                ]  # fmt: skip
                server.reset()
                run = run_with_rusage(command, limit=limit)
                stats = server.stats()
                written, failed = count_output(out_path)
                rates.append(max(written, 1) / run.wall)
                row.seconds = run.wall
                row.values = {"rss_kb": run.maxrss_kb, "wrapper_kb": run.wrapper_kb}
                row.result = f"{run.maxrss_kb / 1024:,.1f} MB"
                row.reference = (
                    f"{rates[-1]:,.0f} rows/s; {stats['requests'] / max(written, 1):.2f} HTTP "
                    f"requests and {stats['generate_items'] / max(written, 1):.2f} items per "
                    f"row; {written:,} records out"
                )
                if size < asked:
                    row.reference += (
                        f"; CAPPED from {asked:,} rows to fit the {self.s.budget_s:.0f} s budget "
                        f"({asked / rates[-1]:,.0f} s at this rate)"
                    )
                row.status = "—"
                if run.stopped and index != last:
                    row.status = "ERROR"
                    row.result += f" (stopped after {run.wall:.0f} s: {written:,} rows written)"
                elif run.stopped and written and not failed:
                    row.result += f" after {written:,} rows"
                    row.reference += "; STOPPED at the time budget"
                    peaks[written] = run.maxrss_kb
                elif run.code != 0 or written != size or failed:
                    row.status = "ERROR"
                    row.result += f" (exit {run.code}, {written:,} written, {failed:,} failed)"
                    if run.stderr.strip():
                        row.result += ": " + run.stderr.strip().splitlines()[-1][:160]
                else:
                    peaks[size] = run.maxrss_kb
                self.log(f"    {row.measurement}: {row.result}; {row.reference}; {run.wall:.1f} s")
                os.remove(rows_path)
                if os.path.exists(out_path):
                    os.remove(out_path)
        wrappers = [r.values.get("wrapper_kb", 0) for r in self.rows.values() if r.key in keys]
        if wrappers:
            self.notes.append(
                f"Peak RSS of `sglrun batch` is its own `ru_maxrss` under a small wrapper process "
                f"whose own peak ({max(wrappers) / 1024:.1f} MB) is the least it can read."
            )
        done = sorted(peaks)
        a, b = (done[0], done[-1]) if done else (sizes[0], sizes[-1])
        growth = self.row("rss_growth", a=f"{a:,}", b=f"{b:,}")
        growth.target = "<= 1 KB/row"
        if len(done) >= 2 and a == sizes[0]:
            per_row = (peaks[b] - peaks[a]) / (b - a)
            growth.result = f"{per_row:.3f} KB/row"
            growth.reference = f"{(peaks[b] - peaks[a]) / 1024:+,.1f} MB over {b - a:,} rows"
            growth.status = "PASS" if per_row <= 1.0 else "FAIL"
        else:
            growth.result = "not measured (a run failed)"
            growth.status = "ERROR"

    # -------------------------------------------------------------- (4) fork
    def fork(self) -> None:
        import sglrun as sgl
        from bench.fork import fork_then_gen
        from bench.server import ServerProcess

        row = self.row("fork")
        with ServerProcess(delay_ms=200) as server:
            backend = sgl.RuntimeEndpoint(server.url)
            times, requests = [], []
            for _ in range(self.s.fork_runs + 1):  # the first run opens the connections
                server.reset()
                started = time.perf_counter()
                state = fork_then_gen.run(topic="tea", backend=backend)
                times.append(time.perf_counter() - started)
                requests.append(server.stats()["by_path"].get("/generate", 0))
                if state.error() is not None:
                    raise RuntimeError(f"the fork program failed: {state.error()}")
            backend.shutdown()
        cold, warm = times[0], times[1:]
        median = statistics.median(warm)
        row.values = {"seconds": median}
        row.result = f"{median:.3f} s (median of {len(warm)}; first run {cold:.3f} s)"
        row.reference = f"0.400 s floor (2 round trips); {requests[-1]} requests/run"
        row.ratio = f"{median / 0.4:.2f}"
        row.target = "<= 0.45 s"
        row.status = "PASS" if median <= 0.45 else "FAIL"
        row.seconds = sum(times)

    # ------------------------------------------------------- (5) capital_fact
    def capital(self) -> None:
        from bench.capital import compare

        count = self.s.capital_rows
        a = self.row("capital_sglrun", n=count)
        b = self.row("capital_hand", n=count)
        result = compare(
            count,
            self.s.capital_threads,
            self.log,
            rounds=self.s.capital_rounds,
            warm=self.s.capital_warm,
        )
        rounds = len(result["sglrun_rounds"])

        def timing(seconds: float, all_rounds: list[float]) -> str:
            shown = ", ".join(f"{t:.1f}" for t in all_rounds)
            return f"{count / seconds:.2f} programs/s (best of {rounds}: {shown} s)"

        a.result = timing(result["sglrun_s"], result["sglrun_rounds"])
        b.result = timing(result["hand_s"], result["hand_rounds"])
        a.reference = f"{result['hand_pps']:.2f} programs/s (hand loop)"
        b.reference = result["hand_detail"]
        ratio = result["sglrun_pps"] / result["hand_pps"]
        a.ratio = f"{ratio:.2f}"
        a.target = ">= 0.95"
        a.status = "PASS" if ratio >= 0.95 else "FAIL"
        b.status = "—"
        a.seconds, b.seconds = result["sglrun_total_s"], result["hand_total_s"]
        self.notes.append(
            f"capital_fact: {result['same_outputs']}/{count} rows gave the same capital and fact "
            f"on both sides; engine start and warm-up (not timed) took {result['setup_s']:.0f} s."
        )

    # -------------------------------------------------------- (7) and (8)
    def latency(self) -> None:
        from bench.latency import measure

        measure(self)

    def engine(self) -> None:
        from bench.engine import measure

        measure(self)

    def constrained(self) -> None:
        from bench.constrained import measure

        measure(self)

    def cache(self) -> None:
        from bench.cache import measure

        measure(self)

    # ----------------------------------------------------------- (6) startup
    def ray(self) -> None:
        from bench.ray_scale import measure

        measure(self)

    def startup(self) -> None:
        runs = self.s.startup_runs
        help_row = self.row("help")
        times = time_command([os.path.join(BIN, "sglrun"), "--help"], runs)
        median = statistics.median(times)
        help_row.values = {"seconds": median}
        help_row.result = f"{median:.3f} s (median of {runs})"
        help_row.reference = f"min {min(times):.3f} s, max {max(times):.3f} s"
        help_row.target = "<= 0.3 s"
        help_row.status = "PASS" if median <= 0.3 else "FAIL"
        help_row.seconds = sum(times)
        import_row = self.row("import")
        times = time_command([sys.executable, "-c", "import sglrun"], runs)
        bare = time_command([sys.executable, "-c", "pass"], runs)
        median = statistics.median(times)
        import_row.result = f"{median:.3f} s (median of {runs})"
        import_row.reference = f"bare interpreter {statistics.median(bare):.3f} s"
        import_row.status = "—"
        import_row.seconds = sum(times) + sum(bare)

    # ------------------------------------------------------------------ run
    def parts(self) -> dict[str, tuple[str, list[str], Callable[[], None]]]:
        """Parts in the order they run: the long RSS part last, so it can fit the budget."""
        return {
            "6": ("(6) start-up", ["help", "import"], self.startup),
            "4": ("(4) fork", ["fork"], self.fork),
            "1b": ("(1b) FakeBackend", ["batch_fake"], self.fake),
            "1": ("(1)+(2) throughput and floor",
                  ["floor_aiohttp", "floor_urllib3", "batch_solo", "batch_small",
                   "batch_large"],
                  self.throughput),
            "7": ("(7) latency-bound batches",
                  [k for k in ROW_KEYS if k.startswith("latency_")], self.latency),
            "5": ("(5) capital_fact on SmolLM2", ["capital_sglrun", "capital_hand"],
                  self.capital),
            "8": ("(8) the embedded engine's tokens/s", ["engine_sglrun"], self.engine),
            "9": ("(9) constrained decoding", ["constrained"], self.constrained),
            "10": ("(10) the call cache", [k for k in ROW_KEYS if k.startswith("cache_")],
                   self.cache),
            "11": ("(11) scale-out on Ray", ["ray_overhead", "ray_startup", "ray_scale"],
                   self.ray),
            "3": ("(3) sglrun batch peak RSS",
                  ["rss_small", "rss_medium", "rss_large", "rss_growth"], self.rss),
        }  # fmt: skip

    def run(self, only: set[str] | None = None) -> None:
        self.started = time.perf_counter()
        for key, (name, keys, func) in self.parts().items():
            if only is not None and key not in only:
                continue
            limit = self.s.part_limit_s if self.s.quick else PART_LIMITS[key]
            if self.s.budget_s:  # no part may run past the budget (the last one sizes itself)
                left = self.s.budget_s - (time.perf_counter() - self.started)
                limit = left + 60 if key == "3" else min(limit, max(left, 30.0))
            self.part(name, keys, func, limit)

    def ordered_rows(self) -> list[Row]:
        order = {key: index for index, key in enumerate(ROW_KEYS)}
        return sorted(self.rows.values(), key=lambda row: order.get(row.key, len(order)))


def parse_sizes(text: str, count: int) -> tuple[int, ...]:
    values = tuple(int(x.replace("_", "")) for x in text.split(","))
    if len(values) != count or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected {count} positive sizes, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--output", help="markdown file (default: BENCHMARKS.md; none if --quick)")
    parser.add_argument("--batch-sizes", help="two sizes for (1), e.g. 2000,20000")
    parser.add_argument("--rss-sizes", help="three sizes for (3), e.g. 2000,20000,200000")
    parser.add_argument("--floor-programs", type=int, help="programs for the aiohttp floor")
    parser.add_argument("--capital-rows", type=int, help="rows of capital_fact for (5)")
    parser.add_argument("--num-threads", help="run_batch num_threads for (1) (default auto)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--only", help="comma-separated parts to run: 1,1b,3,...,10,11")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run (default 1000; 0: no limit); "
        "the largest RSS size shrinks to fit",
    )
    args = parser.parse_args(argv)

    settings = dataclasses.replace(QUICK if args.quick else Settings())
    if args.batch_sizes:
        settings.batch_sizes = parse_sizes(args.batch_sizes, 2)  # type: ignore[assignment]
    if args.rss_sizes:
        settings.rss_sizes = parse_sizes(args.rss_sizes, 3)  # type: ignore[assignment]
    if args.floor_programs:
        settings.floor_aiohttp = args.floor_programs
        settings.floor_urllib3 = max(1, args.floor_programs // 2)
    if args.budget is not None:
        settings.budget_s = args.budget
    elif args.rss_sizes:
        settings.budget_s = 0.0  # explicit sizes are run as asked
    if args.capital_rows:
        settings.capital_rows = args.capital_rows
    if args.num_threads:
        settings.num_threads = (
            args.num_threads if args.num_threads == "auto" else int(args.num_threads)
        )
    output = args.output if args.output else (None if args.quick else "BENCHMARKS.md")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    os.chdir(ROOT)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    load_before = os.getloadavg()
    started = time.perf_counter()
    bench = Bench(settings, log)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - bench.parts().keys()
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    bench.run(only)
    total = time.perf_counter() - started
    info = machine()
    load_after = os.getloadavg()
    info["load"] = (
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute load average; the "
        f"run itself keeps about 2 busy: more means other processes shared the cores)"
    )
    markdown = render_markdown(bench, info, total, argv)
    print(table(bench.ordered_rows()))
    print(f"\nTotal: {total:.1f} s (" + "; ".join(f"{n} {t:.1f} s" for n, t in bench.timings) + ")")
    if output:
        with open(output if os.path.isabs(output) else os.path.join(ROOT, output), "w") as handle:
            handle.write(markdown)
        print(f"wrote {output}")
    if args.json:
        record = {
            "machine": info,
            "total_s": total,
            "timings": dict(bench.timings),
            "rows": [dataclasses.asdict(row) for row in bench.ordered_rows()],
        }
        with open(args.json, "wb") as handle:
            handle.write(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    errors = [row for row in bench.rows.values() if row.status == "ERROR"]
    if bench.hung:  # hung threads would keep the interpreter from exiting
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    return 1 if errors else 0
