"""The call cache from the command line: on by default for ``batch``, the switches, the
``sglrun cache`` command, two processes on one file, a corrupt file, and a run killed
mid-row that replays the finished steps of its rows (requests counted at the server)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import SGLRUN, clean_env, read_jsonl, write_jsonl, write_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from sglang_stub import SGLangStub  # noqa: E402

PROGRAM = """
import sglrun as sgl


@sgl.function
def three(s, topic: str):
    s += "Topic: " + topic + "\\nStep1:" + sgl.gen("one", max_tokens=4, stop="\\n")
    s += "\\nStep2:" + sgl.gen("two", max_tokens=4, temperature=0.8)
    s += "\\nStep3:" + sgl.select("three", choices=["yes", "no"])
"""


class HangingStub(SGLangStub):
    """The stub, able to hold every step-3 request until told to stop."""

    hang = threading.Event()

    def generate(self, handler, body):
        text = body.get("text") if isinstance(body, dict) else None
        texts = text if isinstance(text, list) else [text]
        if self.hang.is_set() and any("Step3" in (t or "") for t in texts):
            time.sleep(30)
        super().generate(handler, body)


def steps(server: SGLangStub) -> dict[str, int]:
    """How many /generate items each step of the program sent."""
    counts = {"step1": 0, "step2": 0, "step3": 0}
    for prompt in server.prompts():
        counts["step3" if "Step3" in prompt else "step2" if "Step2" in prompt else "step1"] += 1
    return counts


@pytest.fixture
def server():
    with HangingStub() as stub:
        yield stub
        stub.hang.clear()


@pytest.fixture
def job(tmp_path):
    program = write_program(tmp_path, PROGRAM)
    write_jsonl(tmp_path / "in.jsonl", [{"topic": f"topic {i}"} for i in range(40)])
    return program


def batch(tmp_path, server, *args, env=None, timeout=120):
    command = [SGLRUN, "batch", "prog.py", "in.jsonl", "--backend", "sglang", "--url", server.url]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=tmp_path, timeout=timeout,
        env=clean_env(tmp_path, **(env or {})),
    )  # fmt: skip


def cache_file(tmp_path) -> Path:
    """Where the default cache of these runs lives (the test's own user cache dir)."""
    import os

    return Path(os.environ["XDG_CACHE_HOME"]) / "sglrun" / "calls.sqlite"


def test_batch_caches_by_default_and_a_rerun_sends_nothing(tmp_path, server, job):
    first = batch(tmp_path, server, "-o", "out.jsonl")
    assert first.returncode == 0, first.stderr
    assert steps(server)["step1"] == 40
    assert "cache 0 of 120 calls" in first.stderr
    assert cache_file(tmp_path).exists()

    server.clear()
    second = batch(tmp_path, server, "-o", "again.jsonl", "--include", "meta")
    assert second.returncode == 0, second.stderr
    assert server.posted("/generate") == []
    assert "cache 120 of 120 calls" in second.stderr and "tokens saved" in second.stderr
    records = read_jsonl(tmp_path / "again.jsonl")
    earlier = read_jsonl(tmp_path / "out.jsonl")
    assert [r["vars"]["one"] for r in records] == [r["vars"]["one"] for r in earlier]
    assert records[0]["meta"]["one"]["cached"] is True
    assert records[0]["meta"]["three"]["cached"] is True


def test_the_switches(tmp_path, server, job):
    assert batch(tmp_path, server, "-o", "a.jsonl").returncode == 0
    server.clear()
    off = batch(tmp_path, server, "-o", "b.jsonl", "--no-cache")
    assert off.returncode == 0 and steps(server)["step1"] == 40 and "cache" not in off.stderr

    server.clear()
    refreshed = batch(tmp_path, server, "-o", "c.jsonl", "--cache-mode", "refresh")
    assert refreshed.returncode == 0 and steps(server)["step2"] == 40
    assert "cache 0 of 120 calls" in refreshed.stderr

    server.clear()
    env_off = batch(tmp_path, server, "-o", "d.jsonl", env={"SGLRUN_CACHE": "off"})
    assert env_off.returncode == 0 and steps(server)["step1"] == 40

    server.clear()  # --cache PATH: another file, so everything is sent once more
    own = batch(tmp_path, server, "-o", "e.jsonl", "--cache", "mine.sqlite")
    assert own.returncode == 0 and steps(server)["step1"] == 40
    assert (tmp_path / "mine.sqlite").exists()
    server.clear()  # a bare --cache (before another flag) is the default place again
    bare = batch(tmp_path, server, "--cache", "-o", "f.jsonl")
    assert bare.returncode == 0, bare.stderr
    assert server.posted("/generate") == []

    (tmp_path / "sglrun.yaml").write_text("cache:\n  path: from-config.sqlite\n  mode: use\n")
    server.clear()
    configured = batch(tmp_path, server, "-o", "g.jsonl")
    assert configured.returncode == 0 and steps(server)["step1"] == 40
    assert (tmp_path / "from-config.sqlite").exists()

    bad = batch(tmp_path, server, "-o", "h.jsonl", "--cache-mode", "sometimes")
    assert bad.returncode == 2
    assert "--cache-mode" in bad.stderr and "use, refresh, off" in bad.stderr


def test_an_edit_of_step_3_sends_only_step_3(tmp_path, server, job):
    assert batch(tmp_path, server, "-o", "a.jsonl").returncode == 0
    source = (tmp_path / "prog.py").read_text().replace('"\\nStep3:"', '"\\nStep3 (now):"')
    (tmp_path / "prog.py").write_text(source)
    server.clear()
    edited = batch(tmp_path, server, "-o", "b.jsonl")
    assert edited.returncode == 0, edited.stderr
    sent = steps(server)
    assert sent["step1"] == 0 and sent["step2"] == 0 and sent["step3"] >= 40
    assert "cache 80 of 120 calls" in edited.stderr


def test_two_processes_share_one_cache(tmp_path, server, job):
    rows = [{"topic": f"topic {i}"} for i in range(300)]
    write_jsonl(tmp_path / "one.jsonl", rows[:200])
    write_jsonl(tmp_path / "two.jsonl", rows[100:])  # 100 rows in common
    command = [SGLRUN, "batch", "prog.py", "--backend", "sglang", "--url", server.url,
               "--cache", "shared.sqlite"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*command, name, "-o", f"{name}.out"], cwd=tmp_path, env=clean_env(tmp_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name in ("one.jsonl", "two.jsonl")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with sqlite3.connect(tmp_path / "shared.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 900
    write_jsonl(tmp_path / "all.jsonl", rows)
    server.clear()
    rerun = subprocess.run(
        [*command, "all.jsonl", "-o", "all.out"], cwd=tmp_path, env=clean_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert server.posted("/generate") == []


def test_a_corrupt_cache_warns_once_and_the_batch_runs(tmp_path, server, job):
    (tmp_path / "broken.sqlite").write_bytes(b"\x00garbage, not a database\n" * 500)
    result = batch(tmp_path, server, "-o", "out.jsonl", "--cache", "broken.sqlite")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "broken.sqlite" in warnings[0]
    assert "running without the cache" in warnings[0]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 40
    assert (tmp_path / "broken.sqlite").read_bytes().startswith(b"\x00garbage")


def test_a_killed_run_replays_the_finished_steps_of_its_rows(tmp_path, server, job):
    server.hang.set()  # every step 3 hangs: all 40 rows stop there, steps 1 and 2 done
    proc = subprocess.Popen(
        [SGLRUN, "batch", "prog.py", "in.jsonl", "-o", "out.jsonl", "--backend", "sglang",
         "--url", server.url, "-q"],
        cwd=tmp_path, env=clean_env(tmp_path, SGLRUN_COALESCE="false"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        stored = 0
        while time.monotonic() < deadline:  # the finished calls reach the file within ms
            if cache_file(tmp_path).exists():
                with sqlite3.connect(cache_file(tmp_path)) as conn:
                    try:
                        stored = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
                    except sqlite3.OperationalError:  # made, its schema not yet committed
                        stored = 0
            if stored >= 80 and steps(server)["step3"] >= 1:
                break
            time.sleep(0.05)
        assert stored >= 80, f"only {stored} calls stored"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert read_jsonl(tmp_path / "out.jsonl") == [] if (tmp_path / "out.jsonl").exists() else True

    server.hang.clear()
    server.clear()
    resumed = batch(tmp_path, server, "-o", "out.jsonl", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    sent = steps(server)
    assert sent["step1"] == 0 and sent["step2"] == 0, sent  # replayed from the cache
    assert sent["step3"] >= 40
    records = read_jsonl(tmp_path / "out.jsonl")
    assert len(records) == 40 and all(r["vars"]["three"] in ("yes", "no") for r in records)


def test_run_caches_only_when_asked(tmp_path, server, job):
    def run(*extra):
        return subprocess.run(
            [SGLRUN, "run", "prog.py", "--json", "--backend", "sglang", "--url", server.url,
             *extra, "--", "--topic", "x"],
            capture_output=True, text=True, cwd=tmp_path, env=clean_env(tmp_path), timeout=60,
        )  # fmt: skip

    assert run().returncode == 0 and run().returncode == 0
    assert steps(server)["step1"] == 2  # off by default: a run at a terminal wants new text
    server.clear()
    first = run("--cache")
    second = run("--cache")
    assert first.returncode == second.returncode == 0, second.stderr
    assert steps(server)["step1"] == 1
    assert json.loads(first.stdout) == json.loads(second.stdout)


def test_the_cache_command(tmp_path, server, job):
    assert batch(tmp_path, server, "-o", "a.jsonl").returncode == 0
    assert batch(tmp_path, server, "-o", "b.jsonl").returncode == 0
    env = clean_env(tmp_path)

    def cache(*args):
        return subprocess.run(
            [SGLRUN, "cache", *args], capture_output=True, text=True, cwd=tmp_path, env=env
        )

    stats = cache("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    found = json.loads(stats.stdout)
    assert found["entries"] == 120 and found["hits"] == 120 and found["misses"] == 120
    assert found["tokens_saved"] > 0 and found["path"] == str(cache_file(tmp_path))
    shown = cache("stats").stdout
    assert "entries       120" in shown and "B per entry" in shown

    assert "removed 0 entries" in cache("prune", "--older-than", "30d").stdout
    bad = cache("prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr
    assert cache("prune").returncode == 2
    with sqlite3.connect(cache_file(tmp_path)) as conn:
        conn.execute("UPDATE calls SET used = used - 7200")
    assert "removed 120 entries" in cache("prune", "--older-than", "1h").stdout
    assert batch(tmp_path, server, "-o", "c.jsonl").returncode == 0
    assert "removed 120 entries" in cache("clear").stdout
    assert json.loads(cache("stats", "--json").stdout)["entries"] == 0

    (tmp_path / "note.txt").write_text("not a cache")
    broken = cache("stats", "--cache", "note.txt")
    assert broken.returncode == 1 and "note.txt" in broken.stderr
    assert (tmp_path / "note.txt").read_text() == "not a cache"

    for command in (["stats", "--json"], ["clear"], ["prune", "--older-than", "1d"]):
        looked = cache(*command, "--cache", "none.sqlite")  # looking never makes a cache
        assert looked.returncode == 0, looked.stderr
        assert not (tmp_path / "none.sqlite").exists()
    assert json.loads(cache("stats", "--json", "--cache", "none.sqlite").stdout)["entries"] == 0
    assert "no cache at" in cache("clear", "--cache", "none.sqlite").stdout
