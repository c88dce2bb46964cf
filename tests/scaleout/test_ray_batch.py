"""``sglrun batch --ray`` on a real local Ray cluster (2 CPUs) against the SGLang stub: records
as local mode writes them, error rows, a worker that dies, Parquet, the output directory's
rules, and bad input. The CLI runs in-process (typer's CliRunner) on the module's cluster."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sglrun.cli.app import app

from .conftest import read_jsonl, read_parts, rows, write_jsonl, write_program

pytestmark = pytest.mark.slow


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def batch(tmp_path, server, inputs, out, *extra: str):
    return invoke(
        "batch", str(tmp_path / "prog.py"), *map(str, inputs), "-o", str(out),
        "--backend", "sglang", "--url", server.url, "--id-field", "id", "--concurrency", "16",
        "--no-cache", "-q", *extra,
    )  # fmt: skip


def ray_config(tmp_path, **section) -> str:
    path = tmp_path / "sglrun.yaml"
    path.write_text(json.dumps({"ray": section}))
    return str(path)


def test_records_are_those_of_local_mode(cluster, server, tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(2000))
    local = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "local.jsonl")
    assert local.exit_code == 0, local.output
    sent_local = len(server.prompts())
    server.clear()
    config = ray_config(tmp_path, rows_per_batch=500)
    result = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "out",
                   "--ray", "--config", config)  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = {r["id"]: r for r in read_jsonl(tmp_path / "local.jsonl")}
    got = read_parts(tmp_path / "out")
    assert len(got) == 2000
    assert {r["id"]: r for r in got} == expected  # record for record, byte-equal values
    assert len(server.prompts()) == sent_local  # each call once, as in local mode
    manifest = json.loads((tmp_path / "out" / "sglrun-manifest.json").read_text())
    assert (manifest["status"], manifest["rows"], manifest["ok"]) == ("completed", 2000, 2000)
    assert len(manifest["parts"]) == 4 == len(list((tmp_path / "out").glob("part-*.jsonl")))
    assert {p["part"] for p in manifest["parts"]} == {
        p.name for p in (tmp_path / "out").glob("part-*.jsonl")
    }


def test_two_workers_share_the_blocks(cluster, server, tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(400))
    from sglrun.ray.driver import RayJob, RaySettings, run_on_ray

    job = _job(tmp_path, server, RaySettings(rows_per_block=50, min_workers=2, max_workers=2))
    job.prepare()
    stats = run_on_ray(job)
    assert (stats.status, stats.done, stats.ok) == ("completed", 400, 400)
    assert len(stats.workers) == 2  # both actors ran blocks
    assert isinstance(job, RayJob)


def _job(tmp_path, server, settings, **flags):
    from sglrun.cli.config import load_settings
    from sglrun.cli.ray_cmd import WorkerSetup
    from sglrun.ray.driver import RayJob
    from sglrun.ray.worker import RunOptions

    settings_ = load_settings(flags={"backend": "sglang", "url": [server.url],
                                     "concurrency": 16, "cache": False}, cwd=tmp_path)
    setup = WorkerSetup(settings_, "sglang", False, str(tmp_path / "prog.py"), None)
    return RayJob(
        inputs=[str(tmp_path / "in.jsonl")], outdir=str(tmp_path / "out"), setup=setup,
        options=RunOptions(id_field="id"), program={"path": "prog.py", "fingerprint": "x"},
        ray=settings, **flags,
    )  # fmt: skip


def test_a_row_that_raises_is_one_error_record(cluster, server, tmp_path):
    write_program(tmp_path)
    data = rows(300)
    data[123]["question"] = "boom"
    write_jsonl(tmp_path / "in.jsonl", data)
    result = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "out", "--ray",
                   "--config", ray_config(tmp_path, rows_per_batch=100))  # fmt: skip
    assert result.exit_code == 1, result.output  # some rows failed, as in local mode
    got = {r["id"]: r for r in read_parts(tmp_path / "out")}
    assert len(got) == 300
    assert got["r123"]["error"]["message"] == "the program refused this row"
    assert all(r["error"] is None for key, r in got.items() if key != "r123")
    assert "1 of 300 rows failed" in result.output


def test_a_worker_that_dies_has_its_block_rerun(cluster, server, tmp_path):
    write_program(tmp_path)
    data = rows(600)
    marker = tmp_path / "died-once"
    data[250]["question"] = f"die:{marker}"
    write_jsonl(tmp_path / "in.jsonl", data)
    result = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "out", "--ray",
                   "--config", ray_config(tmp_path, rows_per_batch=100))  # fmt: skip
    assert marker.exists()  # a worker process really died mid-block
    assert result.exit_code == 0, result.output
    ids = [r["id"] for r in read_parts(tmp_path / "out")]
    assert sorted(ids) == sorted(r["id"] for r in data)  # every id exactly once
    assert len(list((tmp_path / "out").glob("part-*"))) == 6
    assert not list((tmp_path / "out").glob(".part-*"))  # no temporary left behind


def test_parquet_in_and_out(cluster, server, tmp_path):
    write_program(tmp_path)
    data = rows(250)
    table = pa.Table.from_pylist(data)
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=60)
    write_jsonl(tmp_path / "in.jsonl", data)
    local = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "local.jsonl")
    assert local.exit_code == 0, local.output
    result = batch(tmp_path, server, [tmp_path / "in.parquet"], tmp_path / "out", "--ray",
                   "--format", "parquet", "--config", ray_config(tmp_path, rows_per_batch=100))
    assert result.exit_code == 0, result.output
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 3  # row groups of 60 gathered to >= 100 rows: 120, 120, 10
    got = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
    expected = {r["id"]: r for r in read_jsonl(tmp_path / "local.jsonl")}
    assert len(got) == 250
    for row in got:
        record = expected[row["id"]]
        assert (row["answer"], row["sure"], row["error"]) == (
            record["vars"]["answer"], record["vars"]["sure"], None)


def test_ids_without_id_field_are_file_and_line(cluster, server, tmp_path):
    write_program(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"question": "one"}, {"question": "two"}])
    with open(tmp_path / "data" / "b.jsonl", "w") as handle:
        handle.write('{"question": "three"}\n\nnot json\n')
    result = invoke(
        "batch", str(tmp_path / "prog.py"), str(tmp_path / "data"), "-o", str(tmp_path / "out"),
        "--backend", "sglang", "--url", server.url, "--no-cache", "-q", "--ray",
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the line that is not JSON is an error row
    got = {r["id"]: r for r in read_parts(tmp_path / "out")}
    a, b = tmp_path / "data" / "a.jsonl", tmp_path / "data" / "b.jsonl"
    assert set(got) == {f"{a}#1", f"{a}#2", f"{b}#1", f"{b}#3"}
    assert "not valid JSON" in got[f"{b}#3"]["error"]["message"]
    assert f"{b}:3" in got[f"{b}#3"]["error"]["message"]  # named as local mode names it


def test_output_directory_rules(cluster, server, tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(20))
    out = tmp_path / "out"
    assert batch(tmp_path, server, [tmp_path / "in.jsonl"], out, "--ray").exit_code == 0
    again = batch(tmp_path, server, [tmp_path / "in.jsonl"], out, "--ray")
    assert again.exit_code == 2 and "--resume continues it" in again.output
    server.clear()
    resumed = batch(tmp_path, server, [tmp_path / "in.jsonl"], out, "--ray", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert server.prompts() == []  # every block was done: nothing sent
    write_jsonl(tmp_path / "in.jsonl", rows(21))
    changed = batch(tmp_path, server, [tmp_path / "in.jsonl"], out, "--ray", "--resume")
    assert changed.exit_code == 2 and "the inputs changed" in changed.output
    replaced = batch(tmp_path, server, [tmp_path / "in.jsonl"], out, "--ray", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert len(read_parts(out)) == 21
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    foreign = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "theirs", "--ray",
                    "--overwrite")  # fmt: skip
    assert foreign.exit_code == 2 and "did not write" in foreign.output
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing column", "no such file", "local-only flag"])
def test_bad_input_is_one_clear_line(cluster, server, tmp_path, case):
    write_program(tmp_path)
    (tmp_path / "in.csv").write_text("id,query\n1,hello\n")
    inputs = [tmp_path / "in.csv"] if case != "no such file" else [tmp_path / "nope.jsonl"]
    extra = ["--limit", "3"] if case == "local-only flag" else []
    local = batch(tmp_path, server, inputs, tmp_path / "local.jsonl", *extra)
    result = batch(tmp_path, server, inputs, tmp_path / "out", "--ray", *extra)
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    if case == "local-only flag":
        assert message == "sglrun: error: --limit does not apply with --ray (it is a flag of " \
            "local runs)"
        return
    assert local.exit_code == 2
    assert message == local.output.strip().splitlines()[-1]  # the words of local mode
    assert server.prompts() == []


def test_several_inputs_need_ray(tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", rows(1))
    write_jsonl(tmp_path / "b.jsonl", rows(1))
    result = invoke("batch", str(tmp_path / "prog.py"), str(tmp_path / "a.jsonl"),
                    str(tmp_path / "b.jsonl"), "-o", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert result.exit_code == 2
    assert "a local run reads one (or add --ray)" in result.output


def test_local_mode_never_imports_ray(tmp_path):
    import subprocess

    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(3))
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom sglrun.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['batch', {str(tmp_path / 'prog.py')!r}, "
        f"{str(tmp_path / 'in.jsonl')!r}, '-o', {str(tmp_path / 'o.jsonl')!r}, '--backend', "
        "'fake', '--no-cache', '-q'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    env = {"SGLRUN_FAKE_REPLIES": '["hello"]', "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_inputs_through_a_filesystem_uri(cluster, server, tmp_path):
    """A path with a scheme goes through pyarrow.fs, as s3:// and gs:// do (file:// here)."""
    write_program(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", rows(30))
    pq.write_table(pa.Table.from_pylist(rows(40)[30:]), tmp_path / "data" / "b.parquet")
    uri = f"file://{tmp_path / 'data'}"
    result = batch(tmp_path, server, [uri], tmp_path / "out", "--ray",
                   "--config", ray_config(tmp_path, rows_per_batch=10))  # fmt: skip
    assert result.exit_code == 0, result.output
    got = sorted(r["id"] for r in read_parts(tmp_path / "out"))
    assert got == sorted(r["id"] for r in rows(40))
    manifest = json.loads((tmp_path / "out" / "sglrun-manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [f"{uri}/a.jsonl", f"{uri}/b.parquet"]


def test_a_worker_too_big_for_the_cluster_is_refused(server, tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(3))
    from sglrun.ray.driver import RaySettings, _pool

    with pytest.raises(Exception, match="no worker could ever start"):
        _pool(RaySettings(cpus_per_worker=64), 1)


def test_a_row_that_always_kills_its_worker_fails_the_run_not_loops(cluster, server, tmp_path):
    write_program(tmp_path)
    data = rows(300)
    data[250]["question"] = "kill-always"
    write_jsonl(tmp_path / "in.jsonl", data)
    result = batch(tmp_path, server, [tmp_path / "in.jsonl"], tmp_path / "out", "--ray",
                   "--config", ray_config(tmp_path, rows_per_batch=100))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "a worker process died 4 times on the same block" in result.output
    assert "run again with --resume" in result.output
    kept = {r["id"] for r in read_parts(tmp_path / "out")}
    assert kept == {f"r{i}" for i in range(200)}  # the two good blocks are kept
    manifest = json.loads((tmp_path / "out" / "sglrun-manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["rows"] == 200


def test_set_up_errors_are_one_line_before_any_row(cluster, server, tmp_path):
    write_program(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", rows(5))
    closed = server.url.rsplit(":", 1)[0] + ":9"  # nothing listens on port 9
    args = ["--backend", "sglang", "--url", closed, "--no-cache", "-q"]
    prog, data = str(tmp_path / "prog.py"), str(tmp_path / "in.jsonl")
    local = invoke("batch", prog, data, "-o", str(tmp_path / "l.jsonl"), *args)
    remote = invoke("batch", prog, data, "-o", str(tmp_path / "out"), *args, "--ray")
    assert local.exit_code == remote.exit_code == 2
    assert remote.output.strip().splitlines()[-1] == local.output.strip().splitlines()[-1]
    # The embedded engine is built in the workers only: its error comes from there.
    engine = invoke("batch", prog, data, "-o", str(tmp_path / "out2"), "--model",
                    str(tmp_path / "missing.gguf"), "-q", "--ray")  # fmt: skip
    assert engine.exit_code == 2, engine.output
    ours = [line for line in engine.output.splitlines() if line.startswith("sglrun: error:")]
    assert len(ours) == 1 and "missing.gguf" in ours[0]  # (Ray may add lines of its own)
    assert ours[0].startswith("sglrun: error: a worker could not start: ModelNotFoundError: ")
