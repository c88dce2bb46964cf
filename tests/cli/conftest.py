"""Shared helpers for the CLI tests: program files, inputs and an isolated environment."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SGLRUN = str(VENV_BIN / "sglrun")

QA_PROGRAM = """
import sglrun as sgl


@sgl.function
def qa(s, question: str, times: int = 1, loud: bool = False):
    \"\"\"Answer a question.\"\"\"
    if question == "boom":
        raise ValueError("the program refused this row")
    text = question * times
    s += "Q: " + (text.upper() if loud else text) + "\\n"
    s += "A:" + sgl.gen("answer", max_tokens=8)
"""


def write_program(directory: Path, source: str = QA_PROGRAM, name: str = "prog.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a subprocess: no user settings, no stray SGLRUN_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLRUN_")}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        SGLRUN_FAKE_REPLIES='["hello world"]',
        PYTHONUNBUFFERED="1",
    )
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path with no user/project settings and the fake backend's default reply."""
    for key in list(os.environ):
        if key.startswith("SGLRUN_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SGLRUN_FAKE_REPLIES", '["hello world"]')
    monkeypatch.chdir(tmp_path)
    return tmp_path
