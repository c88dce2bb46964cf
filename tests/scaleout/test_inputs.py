"""Blocks of the inputs (no Ray needed): cut at line ends, named the same on every plan, ids
that do not depend on the block size, and the input errors of local mode."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sglrun.errors import InputError
from sglrun.ray.inputs import expand_inputs, open_block, plan_blocks


def write(path, text: str):
    path.write_bytes(text.encode())
    return path


def ids_and_lines(blocks, id_field=None):
    found = []
    for block in blocks:
        found += [(row.id, row.line, row.error is None) for row in open_block(block, id_field)]
    return found


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_jsonl_blocks_hold_every_row_once_whatever_their_size(tmp_path, size):
    text = "".join(f'{{"q": {i}}}\n' for i in range(10)) + "\n" + '{"q": 10}'  # blank, no EOL
    path = write(tmp_path / "in.jsonl", text)
    files = expand_inputs([str(path)])
    blocks = plan_blocks(files, size)
    assert blocks[0].start == 0 and blocks[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))  # no gap, no overlap
    got = ids_and_lines(blocks)
    assert got == [(f"{path}#{n}", n, True) for n in [*range(1, 11), 12]]
    assert [b.name for b in blocks] == [b.name for b in plan_blocks(files, size)]  # stable
    assert blocks[0].name == "0001-in-00000"


def test_parquet_blocks_follow_row_groups(tmp_path):
    table = pa.Table.from_pylist([{"id": f"r{i}", "q": str(i)} for i in range(25)])
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    blocks = plan_blocks(expand_inputs([str(tmp_path / "t.parquet")]), 10)
    assert [(b.start, b.end, b.first_line, b.rows) for b in blocks] == [
        (0, 3, 1, 12), (3, 6, 13, 12), (6, 7, 25, 1)]  # fmt: skip
    assert [row_id for row_id, _, _ in ids_and_lines(blocks, "id")] == [f"r{i}" for i in range(25)]


def test_csv_and_gzip_are_one_block_each(tmp_path):
    import gzip

    write(tmp_path / "a.csv", 'id,q\n1,"two\nlines"\n2,x\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write('{"id": 3, "q": "y"}\n')
    blocks = plan_blocks(expand_inputs([str(tmp_path)]), 1)
    assert [(os.path.basename(b.path), b.end, b.rows) for b in blocks] == [
        ("a.csv", -1, 2), ("b.jsonl.gz", -1, 1)]  # fmt: skip
    rows = [row for block in blocks for row in open_block(block, "id")]
    assert [(row.id, row.data["q"]) for row in rows] == [("1", "two\nlines"), ("2", "x"),
                                                         ("3", "y")]  # fmt: skip


def test_globs_and_directories(tmp_path):
    (tmp_path / "d" / "_tmp").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", ".hidden.jsonl", "_SUCCESS", "notes.txt", "_tmp/x.jsonl"):
        write(tmp_path / "d" / name, '{"q": 1}\n')
    listed = [os.path.basename(f.path) for f in expand_inputs([str(tmp_path / "d")])]
    assert listed == ["a.jsonl", "b.jsonl"]
    globbed = expand_inputs([str(tmp_path / "d" / "*.jsonl"), str(tmp_path / "d" / "a.jsonl")])
    assert [os.path.basename(f.path) for f in globbed] == ["a.jsonl", "b.jsonl"]  # each once


@pytest.mark.parametrize("spec,message", [
    ("nope.jsonl", "nope.jsonl: no such input file"),
    ("*.missing", "*.missing: no input file matches this pattern"),
    ("notes.txt", "notes.txt: unknown input format"),
    ("-", "stdin cannot be spread over a cluster"),
    ("empty", "the directory holds no .jsonl"),
])  # fmt: skip
def test_bad_inputs_name_themselves(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "notes.txt", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=message.replace("*", r"\*")):
        expand_inputs([spec])
