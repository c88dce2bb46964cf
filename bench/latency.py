"""(7) Latency-bound batches: a server whose answers take very different times.

The bench server draws each generation item's latency from a seeded lognormal (median 50 ms;
sigma 0 = every answer alike, 1.0 = like real models whose answers differ in length) and a list
request answers when its slowest item would. The reference program runs against it through
``run_batch`` and ``sglrun batch`` (ordered and ``--unordered``) at default settings.

The ideal is what ``N`` programs always in flight would do with the latencies the server
actually drew: ``N / mean program latency``, where a program waits for three lone requests and
one request scoring the two choices of its ``select`` (the slower of two draws). The server also
reports the time-weighted average number of requests it had in flight.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any

from bench.util import BIN, ROOT, write_rows

if TYPE_CHECKING:
    from bench.run import Bench

MEDIAN_MS = 50.0
SEED = 7
MODES = ("run_batch", "batch_ordered", "batch_unordered")
TARGET = 0.9


def ideal_rate(draws: list[float], in_flight: int) -> tuple[float, float]:
    """(programs/s, mean program latency in s) for ``in_flight`` programs always running."""
    mean = statistics.fmean(draws)
    pairs = [max(draws[i], draws[i + 1]) for i in range(0, len(draws) - 1, 2)]
    program = 3 * mean + statistics.fmean(pairs)
    return in_flight / program, program


def _summary_rate(stderr: str) -> float:
    """rows/s from the summary line ``sglrun: N rows, ..., R rows/s, ...``."""
    match = re.search(r"([\d.,]+) rows/s", stderr)
    if match is None:
        raise RuntimeError(f"no summary line in: {stderr[-300:]!r}")
    return float(match.group(1).replace(",", ""))


def measure(bench: Bench) -> None:
    import sglrun as sgl
    from bench.programs import make_rows, reference
    from bench.server import ServerProcess
    from sglrun.lang.scheduler import auto_concurrency

    for sigma, size in zip((1.0, 0.0), bench.s.latency_rows):
        with ServerProcess(latency_median_ms=MEDIAN_MS, latency_sigma=sigma, seed=SEED) as server:
            backend = sgl.RuntimeEndpoint(server.url)
            in_flight = auto_concurrency(backend)
            reference.run_batch(make_rows(bench.s.warmup), backend=backend)
            rows = make_rows(size)
            server.reset()
            started = time.perf_counter()
            states = reference.run_batch(rows, backend=backend)
            rate = size / (time.perf_counter() - started)
            failed = sum(1 for state in states if state.error() is not None)
            del states
            _row(bench, "run_batch", sigma, size, rate, failed, server.stats(), in_flight)
            backend.shutdown()
            with tempfile.TemporaryDirectory(prefix="sglrun-bench-latency-") as tmp:
                rows_path = os.path.join(tmp, "rows.jsonl")
                write_rows(rows_path, size)
                for mode in MODES[1:]:
                    out_path = os.path.join(tmp, f"{mode}.jsonl")
                    command = [
                        os.path.join(BIN, "sglrun"), "batch", os.path.join("bench", "programs.py"),
                        rows_path, "-o", out_path, "--backend", "sglang", "--url", server.url,
                        "-q", "--no-cache",  # as run_batch: every call to the server
                    ] + (["--unordered"] if mode == "batch_unordered" else [])  # fmt: skip
                    server.reset()
                    done = subprocess.run(
                        command, cwd=ROOT, capture_output=True, text=True, timeout=900
                    )
                    failed = 0 if done.returncode == 0 else -1
                    rate = _summary_rate(done.stderr)
                    _row(bench, mode, sigma, size, rate, failed, server.stats(), in_flight)


def _row(
    bench: Bench,
    mode: str,
    sigma: float,
    size: int,
    rate: float,
    failed: int,
    stats: dict[str, Any],
    in_flight: int,
) -> None:
    key = f"latency_{mode}_{'uneven' if sigma else 'even'}"
    row = bench.row(key, n=f"{size:,}")
    ideal, program = ideal_rate(stats["draws"], in_flight)
    requests = stats["requests_in_flight_avg"]
    row.values = {"programs_per_s": rate, "ideal": ideal, "requests_in_flight": requests}
    row.result = f"{rate:,.0f} programs/s; {requests:.1f} requests in flight at the server"
    row.reference = (
        f"ideal {ideal:,.0f}/s ({in_flight} in flight x mean program latency "
        f"{1000 * program:.0f} ms drawn)"
    )
    row.ratio = f"{rate / ideal:.2f}"
    if failed:
        row.status = "ERROR"
        row.result += f"; {'the run failed' if failed < 0 else f'{failed} failed'}"
    elif sigma:
        row.target = f">= {TARGET} of ideal; >= {TARGET} x {in_flight} in flight"
        met = rate / ideal >= TARGET and requests >= TARGET * in_flight
        row.status = "PASS" if met else "FAIL"
    else:
        row.status = "—"
    bench.log(f"    {row.measurement}: {row.result} ({row.reference}, ratio {row.ratio})")
