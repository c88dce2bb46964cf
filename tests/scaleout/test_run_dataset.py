"""``sglrun.ray.run_dataset``: a program as a stage of one's own Ray Data pipeline, on the
module's local cluster against the SGLang stub."""

from __future__ import annotations

import pytest

import sglrun as sgl
from sglrun.errors import InvalidArgumentError
from sglrun.ray import run_dataset

pytestmark = pytest.mark.slow


def load(tmp_path, source):
    from sglrun.cli.loader import load_program

    from .conftest import write_program

    return load_program(str(write_program(tmp_path, source)))


TYPED = """
import sglrun as sgl


@sgl.function
def rate(s, question: str):
    if question == "boom":
        raise ValueError("refused")
    s += "Q: " + question + "\\nA:" + sgl.gen("answer", max_tokens=4, stop="\\n")
    s += "\\nSure:" + sgl.select("sure", choices=["yes", "no"])
"""


def test_columns_in_variables_and_error_out(cluster, server, tmp_path):
    program = load(tmp_path, TYPED)  # a file no worker can import: it travels by value
    items = [{"question": f"q{i}", "key": i} for i in range(40)]
    items[7]["question"] = "boom"
    dataset = cluster.data.from_items(items)
    result = run_dataset(
        dataset, program, backend="sglang", backend_options={"url": server.url},
        workers=2, concurrency=8, rows_per_batch=10, keep=["key"], temperature=0,
    )  # fmt: skip
    out = sorted(result.take_all(), key=lambda row: row["key"])
    assert [row["key"] for row in out] == list(range(40))
    assert set(out[0]) == {"key", "answer", "sure", "error"}
    assert out[7]["error"] == "ValueError: refused" and out[7]["answer"] is None
    others = [row for row in out if row["key"] != 7]
    assert all(row["error"] is None and row["sure"] in ("yes", "no") for row in others)
    assert len(server.prompts()) >= 39  # every other row asked the model


def test_a_backend_factory_builds_one_per_worker(cluster, server, tmp_path):
    program = load(tmp_path, TYPED)
    url = server.url
    dataset = cluster.data.from_items([{"question": "hello"}])
    result = run_dataset(dataset, program, backend=lambda: sgl.RuntimeEndpoint(url))
    (row,) = result.take_all()
    assert row["error"] is None and row["sure"] in ("yes", "no")


def test_arguments_are_checked_at_the_call(cluster, server, tmp_path):
    program = load(tmp_path, TYPED)
    dataset = cluster.data.from_items([{"question": "hello"}])
    with pytest.raises(InvalidArgumentError, match="each worker builds its own"):
        run_dataset(dataset, program, backend=sgl.RuntimeEndpoint(server.url))
    with pytest.raises(InvalidArgumentError, match="workers must be >= 1"):
        run_dataset(dataset, program, backend="sglang", workers=(3, 1))
    with pytest.raises(InvalidArgumentError, match="temperature"):
        run_dataset(dataset, program, backend="sglang", temperature="hot")
