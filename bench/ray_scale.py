"""(11) Scale-out: ``sglrun batch --ray local`` against local mode, side by side in one run.

All runs are the CLI as a user runs it, on the reference program (``bench/programs.py``).

- **Per-row overhead** on the instant server: one worker against local mode, both at the same
  concurrency. Local mode: wall time and machine CPU (``/proc/stat``, less the server's own
  CPU) of a big and a small run; the difference over the rows between them is the cost of one
  more row, start-up cancelled out. Ray: the workers' running time (first part started to last
  part written, from the manifest) and the machine's CPU in that window (sampled every 50 ms,
  less the server's), over its rows: Ray's start-up varies by a second or more from run to
  run, too much to cancel out by difference.
- **Start-up**: the whole command on 20 rows (Ray, one actor, its backend), against local mode.
- **Two workers against one** on the latency server (lognormal, median 50 ms, sigma 1) at the
  same concurrency per worker. Rows/s over the workers' running time (first part started to
  last part written, from the manifest), so start-up does not blur the ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import TYPE_CHECKING, Any

from bench.util import BIN, ROOT, write_rows

if TYPE_CHECKING:
    from bench.run import Bench

OVERHEAD_TARGET_US = 20.0
SCALE_TARGET = 1.8
CONCURRENCY = "32"


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every core)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _process_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Sampler:
    """The machine's and the server's CPU seconds every 50 ms, to read off any window."""

    def __init__(self, server_pid: int) -> None:
        import threading

        self.pid = server_pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _busy_seconds() - _process_seconds(self.pid)))
            self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        def at(moment: float) -> float:
            before = [s for s in self.samples if s[0] <= moment] or self.samples[:1]
            return before[-1][1]

        return at(end) - at(start)


def _run(command: list[str], server_pid: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the machine's, less the server's) of one command."""
    busy, served = _busy_seconds(), _process_seconds(server_pid)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sglrun batch failed ({done.returncode}): {done.stderr[-300:]}")
    cpu = (_busy_seconds() - busy) - (_process_seconds(server_pid) - served)
    return wall, cpu


def _command(rows: str, out: str, url: str, ray: dict[str, Any] | None, tmp: str) -> list[str]:
    command = [os.path.join(BIN, "sglrun"), "batch", os.path.join("bench", "programs.py"), rows,
               "-o", out, "--backend", "sglang", "--url", url, "--no-cache", "-q",
               "--concurrency", CONCURRENCY]  # fmt: skip
    if ray is None:
        return [*command, "--overwrite"]
    shutil.rmtree(out, ignore_errors=True)
    config = os.path.join(tmp, "ray.yaml")
    with open(config, "w") as handle:
        json.dump({"ray": ray}, handle)
    return [*command, "--ray", "local", "--config", config]


def _window(out: str) -> tuple[float, float, int]:
    """When the workers ran (first part started, last part written) and the rows they ran."""
    with open(os.path.join(out, "sglrun-manifest.json")) as handle:
        parts = json.load(handle)["parts"]
    start = min(p["started"] for p in parts)
    end = max(p["started"] + p["seconds"] for p in parts)
    return start, end, sum(p["rows"] for p in parts)


def _running_rate(out: str) -> float:
    """Rows/s while the workers ran."""
    start, end, rows = _window(out)
    return rows / max(end - start, 1e-9)


def measure(bench: Bench) -> None:
    from bench.server import ServerProcess

    big, small = bench.s.ray_rows
    one = {"workers": 1, "rows_per_batch": 1000}
    with tempfile.TemporaryDirectory(prefix="sglrun-bench-ray-") as tmp:
        paths = {}
        for count in (big, small, 20):
            paths[count] = os.path.join(tmp, f"rows{count}.jsonl")
            write_rows(paths[count], count)
        out, parts = os.path.join(tmp, "out.jsonl"), os.path.join(tmp, "parts")
        with ServerProcess() as server:
            pid = server.proc.pid
            _run(_command(paths[small], out, server.url, None, tmp), pid)  # warm the caches
            timed = {}
            for count in (big, small, 20):
                timed["local", count] = _run(_command(paths[count], out, server.url, None, tmp),
                                             pid)  # fmt: skip
            sampler = _Sampler(pid)
            try:
                for count in (big, 20):
                    timed["ray", count] = _run(_command(paths[count], parts, server.url, one,
                                                        tmp), pid)  # fmt: skip
                    if count == big:
                        start, end, done = _window(parts)
                        time.sleep(0.1)
                        window = (end - start, sampler.between(start, end))
            finally:
                sampler.close()
        per_row = {
            "local": [(timed["local", big][i] - timed["local", small][i]) / (big - small)
                      for i in (0, 1)],
            "ray": [window[0] / done, window[1] / done],
        }  # fmt: skip
        overhead_us = (per_row["ray"][0] - per_row["local"][0]) * 1e6
        cpu_us = (per_row["ray"][1] - per_row["local"][1]) * 1e6
        row = bench.row("ray_overhead", n=f"{big:,}")
        row.result = (f"{overhead_us:+.1f} µs/row wall, {cpu_us:+.1f} µs/row CPU "
                      f"(ray {per_row['ray'][0] * 1e6:.0f} µs, "
                      f"{per_row['ray'][1] * 1e6:.0f} µs CPU)")  # fmt: skip
        row.reference = (
            f"local {per_row['local'][0] * 1e6:.0f} µs/row, "
            f"{per_row['local'][1] * 1e6:.0f} µs CPU ({big:,} vs {small:,} rows)"
        )
        row.ratio = f"{per_row['ray'][0] / per_row['local'][0]:.2f}"
        row.target = f"<= {OVERHEAD_TARGET_US:g} µs/row over local"
        row.status = "PASS" if overhead_us <= OVERHEAD_TARGET_US else "FAIL"
        row.values = {"overhead_us": overhead_us, "cpu_us": cpu_us}
        row = bench.row("ray_startup")
        row.result = f"{timed['ray', 20][0]:.1f} s (20 rows, one worker)"
        row.reference = f"local {timed['local', 20][0]:.2f} s"
        row.ratio = f"{timed['ray', 20][0] / timed['local', 20][0]:.1f}"
        row.status = "—"

        latency_rows = bench.s.ray_latency_rows
        slow = os.path.join(tmp, "slow.jsonl")
        write_rows(slow, latency_rows)
        rates = {}
        with ServerProcess(latency_median_ms=50.0, latency_sigma=1.0, seed=5) as server:
            for workers in (1, 2):
                shape = {"workers": workers, "rows_per_batch": max(1, latency_rows // 8)}
                _run(_command(slow, parts, server.url, shape, tmp), server.proc.pid)
                rates[workers] = _running_rate(parts)
        ratio = rates[2] / rates[1]
        row = bench.row("ray_scale", n=f"{latency_rows:,}")
        row.result = f"2 workers {rates[2]:,.0f} rows/s"
        row.reference = f"1 worker {rates[1]:,.0f} rows/s (concurrency {CONCURRENCY} each)"
        row.ratio = f"{ratio:.2f}"
        row.target = f">= {SCALE_TARGET:g}x one worker"
        row.status = "PASS" if ratio >= SCALE_TARGET else "FAIL"
        row.values = {"ratio": ratio}
        bench.log(f"    ray: {timed}; rates {rates}")
