"""``sglrun batch --ray local`` as a user runs it, in its own process with its own cluster:
a driver killed by SIGKILL then ``--resume`` (each id once, no written row sent again, no
process left behind), Ctrl-C (exit 130, clean shutdown), and the embedded engine in 2 actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import SGLRUN, read_parts, rows, write_jsonl, write_program

pytestmark = pytest.mark.slow

SLOW_QA = """
import time

import sglrun as sgl


@sgl.function
def qa(s, question: str):
    time.sleep(0.05)  # rows take a while: the driver is killed mid-run
    s += "Q: " + question + "\\n"
    s += "A:" + sgl.gen("answer", max_tokens=6, stop="\\n")
"""


def env_for(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLRUN_", "RAY_"))}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return env


def command(tmp_path: Path, url: str, *extra: str) -> list[str]:
    return [
        SGLRUN, "batch", str(tmp_path / "prog.py"), str(tmp_path / "in.jsonl"),
        "-o", str(tmp_path / "out"), "--backend", "sglang", "--url", url, "--id-field", "id",
        "--concurrency", "8", "--no-cache", "-q", "--ray", "local", *extra,
    ]  # fmt: skip


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (the cluster it started)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    parents[int(name)] = int(handle.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
    found, stack = set(), [pid]
    while stack:
        current = stack.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    left.add(pid)
        except OSError:
            continue
    return left


def wait_gone(pids: set[int], seconds: float = 20.0) -> set[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def parts_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.jsonl")) if directory.exists() else []


def test_sigkilled_driver_then_resume(server, tmp_path):
    write_program(tmp_path, SLOW_QA)
    write_jsonl(tmp_path / "in.jsonl", rows(2000))
    (tmp_path / "sglrun.yaml").write_text(json.dumps({"ray": {"rows_per_batch": 100}}))
    driver = subprocess.Popen(command(tmp_path, server.url), cwd=tmp_path, env=env_for(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(parts_in(tmp_path / "out")) < 3 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.1)
    cluster = descendants(driver.pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    assert wait_gone(cluster) == set()  # the guard stopped the cluster the driver left
    written = {r["id"] for r in read_parts(tmp_path / "out")}
    assert 300 <= len(written) < 2000
    before = len(server.prompts())
    resumed = subprocess.run(command(tmp_path, server.url, "--resume"), cwd=tmp_path,
                             env=env_for(tmp_path), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    ids = [r["id"] for r in read_parts(tmp_path / "out")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(2000))  # every id exactly once
    sent_again = server.prompts()[before:]
    questions = {p.split("Q: ", 1)[1].split("\n", 1)[0] for p in sent_again}
    assert not {f"question {i[1:]}" for i in written} & questions  # no written row re-sent
    manifest = json.loads((tmp_path / "out" / "sglrun-manifest.json").read_text())
    assert (manifest["status"], manifest["rows"]) == ("completed", 2000)


def test_ctrl_c_stops_and_leaves_nothing(server, tmp_path):
    write_program(tmp_path, SLOW_QA)
    write_jsonl(tmp_path / "in.jsonl", rows(3000))
    (tmp_path / "sglrun.yaml").write_text(json.dumps({"ray": {"rows_per_batch": 100}}))
    driver = subprocess.Popen(
        command(tmp_path, server.url), cwd=tmp_path, env=env_for(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not parts_in(tmp_path / "out") and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.1)
    cluster = descendants(driver.pid)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    assert "--resume" in stderr
    assert wait_gone(cluster) == set()
    manifest = json.loads((tmp_path / "out" / "sglrun-manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert {p["part"] for p in manifest["parts"]} <= {p.name for p in parts_in(tmp_path / "out")}


@pytest.mark.model
def test_embedded_engine_in_two_actors(tmp_path):
    write_program(tmp_path, """
        import sglrun as sgl


        @sgl.function
        def label(s, text: str):
            s += sgl.user("Is this text positive or negative? " + text)
            s += sgl.assistant(sgl.gen("word", max_tokens=4))
            s += sgl.user("How many stars, 1 to 5?")
            s += sgl.assistant(sgl.gen_int("stars", max_tokens=3))
    """)  # fmt: skip
    texts = ["I loved it", "Terrible service", "Fine, I guess", "Best day ever"]
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    (tmp_path / "sglrun.yaml").write_text(json.dumps({"ray": {"rows_per_batch": 2}}))
    done = subprocess.run(
        [SGLRUN, "batch", str(tmp_path / "prog.py"), str(tmp_path / "in.jsonl"), "-o",
         str(tmp_path / "out"), "--id-field", "id", "--temperature", "0", "-q", "--ray", "local"],
        cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = read_parts(tmp_path / "out")
    assert sorted(r["id"] for r in records) == ["0", "1", "2", "3"]
    for record in records:
        assert record["error"] is None
        assert record["vars"]["word"].strip()
        assert isinstance(record["vars"]["stars"], int)
    assert len(parts_in(tmp_path / "out")) == 2
