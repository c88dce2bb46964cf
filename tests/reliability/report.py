"""Run every reliability scenario and print the RELIABILITY.md table (Markdown).

    .venv/bin/python tests/reliability/report.py            # all faults + the crash run
    .venv/bin/python tests/reliability/report.py 5xx hang   # some scenarios only
    .venv/bin/python tests/reliability/report.py integrity  # the integrity table

Each scenario starts the faulty loopback server, runs ``sglrun batch -v`` on 500 rows (the
crash run: 2,000 rows, five SIGKILLs, then ``--resume``) and counts from the output file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the suite as the package it is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "reliability"

from .scenarios import SCENARIOS, run_crash, run_scenario  # noqa: E402

COLUMNS = ["fault", "rows", "lost", "duplicated", "error records", "retries", "exit code",
           "seconds"]  # fmt: skip


INTEGRITY_COLUMNS = ["case", "rows", "lost", "duplicated", "errors", "exit", "note"]


def integrity() -> int:
    """Run ``test_integrity.py`` and print its facts as the integrity table."""
    import json
    import subprocess

    with tempfile.TemporaryDirectory(prefix="sglrun-integrity-") as tmp:
        facts = Path(tmp) / "facts.jsonl"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(Path(__file__).with_name("test_integrity.py"))],
            env={**__import__("os").environ, "INTEGRITY_FACTS": str(facts)},
        )  # fmt: skip
        rows = [json.loads(line) for line in facts.read_text().splitlines()]
    titles = ["case", "rows", "lost", "duplicated", "error records", "exit code", "what happened"]
    print("| " + " | ".join(titles) + " |")
    print("|" + "|".join("---" for _ in titles) + "|")
    for row in sorted(rows, key=lambda r: (len(r["case"].split(".")[0]), r["case"])):
        print("| " + " | ".join(str(row[column]) for column in INTEGRITY_COLUMNS) + " |")
    return done.returncode


def main(argv: list[str]) -> int:
    if argv == ["integrity"]:
        return integrity()
    names = [name for name in argv if name != "crash"] or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}, crash")
        return 2
    rows = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="sglrun-reliability-") as tmp:
        for name in names:
            outcome = run_scenario(SCENARIOS[name], Path(tmp) / name)
            row = outcome.table_row()
            if outcome.run.returncode != outcome.scenario.expect_exit:
                notes.append(f"{name}: exit {outcome.run.returncode}, "
                             f"expected {outcome.scenario.expect_exit}")
            if not outcome.summary or "retr" not in outcome.summary:
                row["retries"] = f"{row['retries']} (-v only)" if row["retries"] else 0
            rows.append(row)
            print(f"  ran {name}: {row}", file=sys.stderr, flush=True)
        if not argv or "crash" in argv:
            crash = run_crash(Path(tmp) / "crash", seed=20240611)
            rows.append(crash.table_row())
            resent = sum(len(ids) for ids in crash.resent.values())
            notes.append(
                f"crash: {crash.killed_mid_run} of {crash.kills} kills hit a running batch, "
                f"{crash.repaired} torn last lines repaired on resume, {resent} written rows "
                "sent to the server again"
            )
            print(f"  ran crash: {rows[-1]}", file=sys.stderr, flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in COLUMNS) + " |")
    for note in notes:
        print(f"\n- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
