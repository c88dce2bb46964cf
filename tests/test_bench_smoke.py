"""Smoke test of the benchmark: ``python -m bench --quick`` runs every part and fills the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(290)
def test_quick_bench_fills_every_row(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from bench.run import ROW_KEYS
    finally:
        sys.path.remove(str(ROOT))
    markdown, record = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--output",
            str(markdown),
            "--json",
            str(record),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = json.loads(record.read_text())["rows"]
    assert [row["key"] for row in rows] == ROW_KEYS
    for row in rows:
        assert row["result"], row
        assert row["status"] not in ("ERROR", ""), row
        assert row["measurement"] in done.stdout  # the table is printed
    text = markdown.read_text()
    assert "| Measurement | Result |" in text
    assert "Machine:" in text and "Python:" in text
    for row in rows:
        assert row["measurement"] in text
