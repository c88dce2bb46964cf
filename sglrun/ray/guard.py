"""A watchdog that stops the Ray processes a driver started when that driver dies unseen.

Why: ``ray.shutdown()`` stops a local cluster at a normal end and after Ctrl-C, but a driver
killed by SIGKILL (or the OOM killer) runs no code, and Ray 2.60 then leaves its per-node
agents running (measured: the dashboard and runtime-env agents stayed, parented to init).
The guard is a tiny process in its own session that holds the read end of a pipe from the
driver. Every half second it notes every process descended from the cluster's roots (the GCS
and the raylet). When the pipe closes without a ``done`` line, the driver is gone: it stops
what it noted (SIGTERM, then SIGKILL after 2 s), checking each pid's start time so a reused
pid is never hit. Linux only (``/proc``); elsewhere there is no guard.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import IO

__all__ = ["Guard", "start_guard"]

_SCAN = 0.5


class Guard:
    """The driver's end: ``watch`` the cluster's root pids, ``close`` once it is stopped."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def _send(self, line: str) -> None:
        stdin: IO[bytes] | None = self.process.stdin
        try:
            if stdin is not None:
                stdin.write(line.encode() + b"\n")
                stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def watch(self, pids: list[int]) -> None:
        for pid in pids:
            self._send(str(pid))

    def close(self) -> None:
        """The cluster was stopped in order: the guard leaves without touching anything."""
        self._send("done")
        if self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_guard() -> Guard | None:
    if not os.path.isdir("/proc"):
        return None
    process = subprocess.Popen(
        [sys.executable, "-m", "sglrun.ray.guard"], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return Guard(process)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process now."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        found[int(name)] = (int(fields[1]), fields[19].decode())
    return found


def _descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    seen: dict[int, str] = {}
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen[pid] = table[pid][1]
        stack.extend(children.get(pid, ()))
    return seen


def _stop(noted: dict[int, str]) -> None:
    def alive() -> list[int]:
        table = _processes()
        return [pid for pid, start in noted.items() if table.get(pid, (0, ""))[1] == start]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is the driver's
    roots: set[int] = set()
    noted: dict[int, str] = {}
    buffer = b""
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([stdin], [], [], _SCAN)
        if ready:
            chunk = os.read(stdin.fileno(), 4096)
            if not chunk:  # the driver died without saying done
                _stop(noted)
                return 0
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip() == b"done":
                    return 0
                if line.strip().isdigit():
                    roots.add(int(line))
        if roots:
            noted.update(_descendants(roots, _processes()))


if __name__ == "__main__":
    sys.exit(main())
