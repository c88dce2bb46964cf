"""A real local Ray cluster (``ray.init(num_cpus=2)``) for the tests of one module, the SGLang
stub (a loopback HTTP server that counts every request) and the programs the tests run."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SGLRUN = str(Path(sys.executable).parent / "sglrun")

sys.path.insert(0, str(ROOT / "tests" / "backends"))
from sglang_stub import SGLangStub  # noqa: E402

QA = """
import os

import sglrun as sgl


@sgl.function
def qa(s, question: str):
    if question == "boom":
        raise ValueError("the program refused this row")
    if question.startswith("die:") and not os.path.exists(question[4:]):
        open(question[4:], "w").close()  # once: the retried block then runs the row
        os.kill(os.getpid(), 9)  # the worker process dies mid-block, as a lost node
    if question == "kill-always":
        os.kill(os.getpid(), 9)
    s += "Q: " + question + "\\n"
    s += "A:" + sgl.gen("answer", max_tokens=6, stop="\\n")
    s += "\\nSure:" + sgl.select("sure", choices=["yes", "no"])
"""


def write_program(directory: Path, source: str = QA, name: str = "prog.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_parts(directory: Path) -> list[dict]:
    records = []
    for part in sorted(directory.glob("part-*.jsonl")):
        text = part.read_bytes()
        assert text == b"" or text.endswith(b"\n"), f"{part.name} does not end with a newline"
        records += read_jsonl(part)
    return records


def rows(count: int) -> list[dict]:
    return [{"id": f"r{i}", "question": f"question {i}"} for i in range(count)]


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture
def server():
    with SGLangStub() as stub:
        yield stub
