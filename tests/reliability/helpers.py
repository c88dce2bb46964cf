"""Shared pieces of the reliability suite: programs, inputs, running the CLI, reading output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("sglrun")

# Two gens per row; the prompt carries "row=<id>" so the server can count requests per row.
TWO_GENS = '''\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    s += "Question about row=" + text + "\\n"
    s += "A:" + sgl.gen("first", max_tokens=4, stop="\\n")
    s += "\\nB:" + sgl.gen("second", max_tokens=4)
'''

ONE_GEN = '''\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    s += "Question about row=" + text + "\\n"
    s += "A:" + sgl.gen("first", max_tokens=4)
'''

SELECT = '''\
import sglrun as sgl


@sgl.function
def answer(s, text: str):
    s += "Is row=" + text + " good? Answer:"
    s += sgl.select("label", choices=["yes", "no", "maybe"])
'''


def sglrun_command() -> list[str]:
    """The installed console script of the venv running the tests (else the module)."""
    if _SCRIPT.exists():
        return [str(_SCRIPT)]
    return [sys.executable, "-c", "from sglrun.cli.entry import main; main()"]


def write_program(directory: Path, source: str = TWO_GENS, name: str = "prog.py") -> Path:
    path = directory / name
    path.write_text(source)
    return path


def row_ids(count: int) -> list[str]:
    return [f"r{index}" for index in range(count)]


def write_rows(path: Path, count: int) -> list[str]:
    ids = row_ids(count)
    with path.open("w") as handle:
        for row_id in ids:
            handle.write(json.dumps({"id": row_id, "text": row_id}) + "\n")
    return ids


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI run: no user config, no keys, no proxies, plain output."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SGLRUN_")
        and key not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
        and "proxy" not in key.lower()
    }
    env.update(
        {
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra)
    return env


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        tail = "\n".join(self.stderr.splitlines()[-25:])
        return f"exit {self.returncode} after {self.seconds:.1f}s: {' '.join(self.args)}\n{tail}"


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    stdin: bytes | None = None,
) -> Run:
    """Run ``sglrun ARGS`` to completion (killed after ``timeout``: a hang is a failure)."""
    command = [*sglrun_command(), *map(str, args)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env if env is not None else clean_env(),
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode("utf-8", "replace")
        err = (exc.stderr or b"").decode("utf-8", "replace")
        raise AssertionError(
            f"sglrun hung: no exit within {timeout}s: {' '.join(command)}\n"
            f"{err[-3000:]}\n{out[-500:]}"
        ) from None
    return Run(
        list(map(str, args)),
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of an output file; fails on a torn or non-JSON line."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path}: the last line is torn (no newline)"
    records = []
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        assert raw.strip(), f"{path}:{number}: blank line"
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise AssertionError(f"{path}:{number}: torn or invalid line: {raw[:200]!r}") from exc
        assert isinstance(record, dict) and set(record) >= {"id", "vars", "error"}, record
        records.append(record)
    return records


def written_ids(path: Path) -> set[str]:
    """Ids of the whole records in a file that may end in a torn line (after a SIGKILL)."""
    if not path.exists():
        return set()
    ids = set()
    for raw in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # the torn tail
        if isinstance(record, dict) and "id" in record:
            ids.add(str(record["id"]))
    return ids


def check_each_id_once(records: Iterable[dict[str, Any]], ids: Sequence[str]) -> dict[str, Any]:
    """Assert every input id has exactly one record (variables or an error); return a summary."""
    records = list(records)
    counts = Counter(str(record["id"]) for record in records)
    missing = [row_id for row_id in ids if counts[row_id] == 0]
    duplicated = sorted(row_id for row_id, count in counts.items() if count > 1)
    unknown = sorted(set(counts) - set(ids))
    assert not missing, f"{len(missing)} rows lost, e.g. {missing[:5]}"
    assert not duplicated, f"{len(duplicated)} rows duplicated, e.g. {duplicated[:5]}"
    assert not unknown, f"records for ids not in the input: {unknown[:5]}"
    errors = [record for record in records if record["error"] is not None]
    for record in records:
        if record["error"] is None:
            assert record["vars"], f"record without variables or error: {record}"
        else:
            assert record["error"]["type"] and record["error"]["message"], record
    return {
        "rows": len(ids),
        "lost": len(missing),
        "duplicated": len(duplicated),
        "errors": len(errors),
        "error_types": Counter(record["error"]["type"] for record in errors),
    }
