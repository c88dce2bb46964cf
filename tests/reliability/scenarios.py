"""Fault scenarios: a faulty server, a 500-row batch through the real CLI, and the facts.

``run_scenario`` is shared by ``test_faults.py`` (which asserts on the facts) and ``report.py``
(which prints them as the table in RELIABILITY.md).
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .faulty_server import Faults, FaultyServer
from .helpers import (
    ONE_GEN,
    SELECT,
    TWO_GENS,
    Run,
    check_each_id_once,
    clean_env,
    read_records,
    sglrun_command,
    write_program,
    write_rows,
)

ROWS = 500
RETRY_LINE = re.compile(
    r"sglrun\.backends\.http: retry (\d+)/(\d+) of POST \S+/generate in ([\d.]+) s"
)
SUMMARY_LINE = re.compile(r"^sglrun: (?:interrupted after )?\d+ rows, .*$", re.M)
PROGRAMS = {"two_gens": TWO_GENS, "one_gen": ONE_GEN, "select": SELECT}
# /generate requests per row when nothing fails (select = prefix request + scoring request).
REQUESTS_PER_ROW = {"two_gens": 2, "one_gen": 1, "select": 2}


@dataclass
class Scenario:
    name: str
    fault: str  # the table's "fault" column
    faults: Faults
    retries: int = 4
    timeout: float = 5.0
    expect_exit: int = 0
    program: str = "two_gens"
    seed: int = 7
    stream: bool = False  # run under a pseudo-terminal with --stream (streamed requests)
    max_seconds: float = 60.0
    # Coalescing off: each request alone, so the faults (drawn per request body) hit the same
    # requests whatever the timing; the scenarios with it on show what happens to lists.
    coalesce: bool = False


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in [
        Scenario("baseline", "none", Faults(), coalesce=True),
        Scenario("5xx", "10% HTTP 500/503", Faults(error_rate=0.10)),
        Scenario(
            "5xx-exhausted",
            "30% HTTP 500/503, 1 retry",
            Faults(error_rate=0.30),
            retries=1,
            expect_exit=1,
        ),
        Scenario(
            "5xx-permanent",
            "10 rows always HTTP 500",
            Faults(error_rate=0.05, fail_rows=frozenset(f"r{i}" for i in range(0, 500, 50))),
            retries=3,
            expect_exit=1,
        ),
        Scenario(
            "429",
            "5% HTTP 429, Retry-After: 1",
            Faults(rate_limit_rate=0.05, retry_after="1"),
        ),
        Scenario(
            "429-short",
            "30% HTTP 429, Retry-After: 0.2",
            Faults(rate_limit_rate=0.30, retry_after="0.2"),
            retries=6,
        ),
        Scenario("reset", "10% connection reset", Faults(reset_rate=0.10)),
        Scenario("cut", "10% body cut half-way", Faults(cut_rate=0.10)),
        Scenario(
            "cut-stream",
            "5% stream cut half-way (--stream)",
            Faults(cut_rate=0.05),
            program="one_gen",
            stream=True,
            expect_exit=1,
        ),
        Scenario(
            "hang",
            "2% hang 4 s > 1 s read timeout",
            Faults(hang_rate=0.02, hang_seconds=4.0),
            timeout=1.0,
            expect_exit=1,
        ),
        Scenario(
            "bad-json", "3% 200 with non-JSON body", Faults(bad_json_rate=0.03), expect_exit=1
        ),
        Scenario(
            "disappear",
            "server gone 5 s mid-run",
            Faults(disappear_after=20, disappear_seconds=5.0),
            retries=8,
        ),
        Scenario(
            "list-faults",
            "coalesced lists: 20% non-JSON, 10% hang > 1 s timeout",
            Faults(bad_json_rate=0.2, hang_rate=0.1, hang_seconds=4.0),
            timeout=1.0,
            expect_exit=1,
            coalesce=True,
        ),
        Scenario(
            "mixed-select",
            "select; 5% each 5xx/429(0.2)/reset/cut",
            Faults(error_rate=0.05, rate_limit_rate=0.05, retry_after="0.2", reset_rate=0.05,
                   cut_rate=0.05),
            program="select",
            retries=5,
        ),
    ]
}


# Fault-free runs of the other programs, to compare variables against.
BASELINES: dict[str, Scenario] = {
    "two_gens": SCENARIOS["baseline"],
    "one_gen": Scenario("baseline-one_gen", "none", Faults(), program="one_gen"),
    "select": Scenario("baseline-select", "none", Faults(), program="select"),
}
ALL = {**SCENARIOS, **{s.name: s for s in BASELINES.values()}}


@dataclass
class Outcome:
    """Everything a scenario run produced, for assertions and for the report table."""

    scenario: Scenario
    run: Run
    ids: list[str]
    records: list[dict[str, Any]]
    facts: dict[str, Any]
    server_log: list[Any]
    downtimes: list[tuple[float, float]]
    workdir: Path
    retry_lines: list[str] = field(default_factory=list)
    summary: str = ""

    @property
    def error_records(self) -> list[dict[str, Any]]:
        return [record for record in self.records if record["error"] is not None]

    def table_row(self) -> dict[str, Any]:
        return {
            "fault": self.scenario.fault,
            "rows": self.facts["rows"],
            "lost": self.facts["lost"],
            "duplicated": self.facts["duplicated"],
            "error records": self.facts["errors"],
            "retries": len(self.retry_lines),
            "exit code": self.run.returncode,
            "seconds": round(self.run.seconds, 1),
        }


def write_config(directory: Path, scenario: Scenario) -> Path:
    """``sglrun.yaml`` in the run's working directory: the short timeout and retry budget."""
    path = directory / "sglrun.yaml"
    path.write_text(
        f"timeout: {scenario.timeout}\nretries: {scenario.retries}\n"
        f"coalesce: {'true' if scenario.coalesce else 'false'}\n"
    )
    return path


def _facts_without_asserting(records: list[dict[str, Any]], ids: list[str]) -> dict[str, Any]:
    try:
        return check_each_id_once(records, ids)
    except AssertionError as exc:
        counts = Counter(str(record["id"]) for record in records)
        return {
            "rows": len(ids),
            "lost": sum(1 for row_id in ids if counts[row_id] == 0),
            "duplicated": sum(1 for count in counts.values() if count > 1),
            "errors": sum(1 for record in records if record["error"] is not None),
            "error_types": Counter(),
            "problem": str(exc),
        }


def run_batch_under_pty(
    command: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[int, str, str, float]:
    """Run with stderr on a pseudo-terminal (so --stream's live panel is on); returns
    (exit code, stdout, stderr as seen on the terminal, seconds)."""
    master, slave = os.openpty()
    env = {**env, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen = bytearray()

    def drain() -> None:
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    chunk = os.read(master, 65536)
                    if not chunk:
                        return
                    screen.extend(chunk)
                elif proc.poll() is not None:
                    return
            except OSError:  # EIO: the child closed the terminal
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"sglrun hung under a terminal: {' '.join(command)}") from None
    finally:
        reader.join(5)
        os.close(master)
    text = screen.decode("utf-8", "replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    return proc.returncode, stdout.decode("utf-8", "replace"), text, time.monotonic() - started


def run_scenario(scenario: Scenario, workdir: Path, rows: int = ROWS) -> Outcome:
    """Start the faulty server, run ``sglrun batch -v`` on ``rows`` rows, collect the facts."""
    workdir.mkdir(parents=True, exist_ok=True)
    program = write_program(workdir, PROGRAMS[scenario.program])
    ids = write_rows(workdir / "rows.jsonl", rows)
    write_config(workdir, scenario)
    output = workdir / "out.jsonl"
    lifetime = scenario.max_seconds + 30
    with FaultyServer(scenario.faults, seed=scenario.seed, max_lifetime=lifetime) as server:
        args = [
            "batch", str(program), "rows.jsonl", "-o", str(output),
            "--backend", "sglang", "--url", server.url, "--id-field", "id", "-v",
        ]  # fmt: skip
        env = clean_env()
        if scenario.stream:
            command = [*sglrun_command(), *args, "--stream"]
            code, stdout, stderr, seconds = run_batch_under_pty(
                command, workdir, env, scenario.max_seconds + 60
            )
            run = Run(args + ["--stream"], code, stdout, stderr, seconds)
        else:
            from .helpers import run_cli

            run = run_cli(args, cwd=workdir, env=env, timeout=scenario.max_seconds + 60)
        log = server.since()
        downtimes = list(server.downtimes)
    records = read_records(output) if output.exists() else []
    summaries = SUMMARY_LINE.findall(run.stderr)
    return Outcome(
        scenario=scenario,
        run=run,
        ids=ids,
        records=records,
        facts=_facts_without_asserting(records, ids),
        server_log=log,
        downtimes=downtimes,
        workdir=workdir,
        retry_lines=[m.group(0) for m in RETRY_LINE.finditer(run.stderr)],
        summary=summaries[-1] if summaries else "",
    )


# ------------------------------------------------------------------------------ crash


@dataclass
class CrashOutcome:
    """What ``run_crash`` saw: the final run, the kills, and rows sent again after being
    written (by the round that sent them; round ``kills`` is the final run)."""

    final: Run
    ids: list[str]
    records: list[dict[str, Any]]
    facts: dict[str, Any]
    kills: int
    killed_mid_run: int
    repaired: int
    resent: dict[int, set[str]]
    requests_per_row: Counter[str]
    seconds: float

    def table_row(self) -> dict[str, Any]:
        return {
            "fault": f"SIGKILL x{self.kills} at random moments, then --resume",
            "rows": self.facts["rows"],
            "lost": self.facts["lost"],
            "duplicated": self.facts["duplicated"],
            "error records": self.facts["errors"],
            "retries": "n/a",
            "exit code": self.final.returncode,
            "seconds": round(self.seconds, 1),
        }


def _wait_for_traffic(server: FaultyServer, mark: int, proc: subprocess.Popen, limit: float):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if server.mark() > mark:
            return
        time.sleep(0.01)


def run_crash(
    workdir: Path, *, seed: int, rows: int = 2000, kills: int = 5, delay: float = 0.02
) -> CrashOutcome:
    """Start a batch, SIGKILL it at a random moment once it talks to the server, resume it
    with ``--resume``; ``kills`` times, then one last ``--resume`` to the end."""
    import random
    import signal

    from .helpers import run_cli, written_ids

    started = time.monotonic()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    program = write_program(workdir)
    ids = write_rows(workdir / "rows.jsonl", rows)
    output = workdir / "out.jsonl"
    env = clean_env()
    killed_mid_run = repaired = 0
    resent: dict[int, set[str]] = {}
    with FaultyServer(Faults(delay=delay), seed=seed, max_lifetime=240) as server:
        args = [
            "batch", str(program), "rows.jsonl", "-o", str(output), "--backend", "sglang",
            "--url", server.url, "--id-field", "id", "--num-threads", "16", "-q",
        ]  # fmt: skip
        for round_number in range(kills):
            done_before = written_ids(output)  # what the last kill left behind
            mark = server.mark()
            extra = ["--resume"] if round_number else []
            log_path = workdir / f"stderr-{round_number}.txt"
            with log_path.open("wb") as stderr:
                proc = subprocess.Popen(
                    [*sglrun_command(), *args, *extra],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
                try:
                    _wait_for_traffic(server, mark, proc, limit=20)
                    time.sleep(rng.uniform(0.1, 1.0))
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed_mid_run += 1
                    proc.wait(timeout=30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            repaired += "repaired the torn last line" in log_path.read_text()
            again = {row for entry in server.since(mark) for row in entry.rows} & done_before
            if again:
                resent[round_number] = again
        done_before = written_ids(output)
        mark = server.mark()
        final = run_cli([*args, "--resume"], cwd=workdir, env=env, timeout=120)
        again = {row for entry in server.since(mark) for row in entry.rows} & done_before
        if again:
            resent[kills] = again
        per_row = server.requests_per_row()
    records = read_records(output)  # fails on a torn or invalid line
    return CrashOutcome(
        final=final,
        ids=ids,
        records=records,
        facts=_facts_without_asserting(records, ids),
        kills=kills,
        killed_mid_run=killed_mid_run,
        repaired=repaired,
        resent=resent,
        requests_per_row=per_row,
        seconds=time.monotonic() - started,
    )
