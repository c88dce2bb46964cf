"""Helpers of the benchmark: input files, child processes with their peak RSS, the machine."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def write_rows(path: str, count: int) -> None:
    from bench.programs import make_rows

    with open(path, "wb") as handle:
        chunk = 10_000
        for start in range(0, count, chunk):
            rows = make_rows(min(count, start + chunk))[start:]
            handle.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))


def count_output(path: str) -> tuple[int, int]:
    """Records written and records that carry an error."""
    if not os.path.exists(path):
        return 0, 0
    written = failed = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break  # a record cut short by a stopped run
            if not line.strip():
                continue
            written += 1
            if b'"error"' in line:
                record = orjson.loads(line)
                if record.get("error"):
                    failed += 1
    return written, failed


# Runs the command as its only child and reports that child's rusage. A child's ru_maxrss
# starts from its parent's RSS at fork/exec time, so the bench process (hundreds of MB after the
# batches) must not be the parent: this small wrapper is. With a time limit it kills the child
# when the limit passes (ru_maxrss is still reported for a killed child).
_WRAPPER = """
import os, subprocess, sys, threading
err_path, out_path, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
stopped = []
with open(err_path, "wb") as err:
    proc = subprocess.Popen(sys.argv[4:], stdout=subprocess.DEVNULL, stderr=err)
    timer = None
    if limit > 0:
        timer = threading.Timer(limit, lambda: (stopped.append(1), proc.kill()))
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    if timer is not None:
        timer.cancel()
own = 0  # this process's own peak (VmHWM: its ru_maxrss would carry its parent's)
with open("/proc/self/status") as status_file:
    for line in status_file:
        if line.startswith("VmHWM:"):
            own = int(line.split()[1])
code = os.waitstatus_to_exitcode(status)
with open(out_path, "w") as out:
    out.write(f"{code} {usage.ru_maxrss} {own} {len(stopped)}")
"""


@dataclasses.dataclass
class ChildRun:
    code: int
    wall: float
    maxrss_kb: int
    stderr: str
    wrapper_kb: int = 0
    stopped: bool = False  # killed when its time limit passed


def run_with_rusage(command: list[str], limit: float = 0.0, timeout: float = 3600) -> ChildRun:
    """Run ``command`` under a fresh wrapper process: exit code, wall seconds, peak RSS (KB,
    ``wait4``), stderr, the wrapper's own peak RSS (the least the figure can be), and whether
    it was stopped at ``limit`` seconds (0: no limit)."""
    with tempfile.TemporaryDirectory(prefix="sglrun-bench-rss-") as tmp:
        err_path, out_path = os.path.join(tmp, "stderr"), os.path.join(tmp, "result")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-S", "-c", _WRAPPER, err_path, out_path, str(limit), *command],
            cwd=ROOT,
            timeout=limit + 60 if limit > 0 else timeout,
        )
        wall = time.perf_counter() - started
        with open(err_path, "rb") as handle:
            stderr = handle.read().decode("utf-8", "replace")
        if done.returncode != 0 or not os.path.exists(out_path):
            return ChildRun(done.returncode or 1, wall, 0, stderr or "the RSS wrapper failed")
        with open(out_path) as handle:
            code, maxrss, own, stopped = (int(x) for x in handle.read().split())
    return ChildRun(code, wall, maxrss, stderr, own, bool(stopped))


def time_command(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {done.returncode}: {done.stderr[-300:]}"
            )
    return times


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
            memory = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for name in ("sglrun", "urllib3", "aiohttp", "orjson", "xllamacpp"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:
            pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "packages": ", ".join(versions),
    }
