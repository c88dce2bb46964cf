"""Reading batch inputs: formats, laziness, per-line errors, and argument conversion."""

from __future__ import annotations

import io
import json
from typing import Optional

import pytest

from sglrun.batch.convert import ParamSpec, convert_row, param_specs
from sglrun.batch.readers import open_rows
from sglrun.errors import InputError, InvalidArgumentError


def write(path, data: bytes | str):
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_rows_carry_index_line_and_id(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"q": "a"}\n\n{"q": "b", "key": 7}\n')
    rows = list(open_rows(path, id_field="key"))
    assert [(r.index, r.line, r.id) for r in rows] == [(0, 1, "line-1"), (1, 3, "7")]
    assert rows[1].data == {"q": "b", "key": 7}
    assert all(r.error is None for r in rows)


def test_bad_json_line_is_an_error_row_and_reading_continues(tmp_path):
    lines = ['{"q": 1}', '{"q": 2 "x": 3}', "[1, 2]", '"text"', '{"q": 5}']
    path = write(tmp_path / "inputs.jsonl", "\n".join(lines) + "\n")
    rows = list(open_rows(path))
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1].data is None
    message = str(rows[1].error)
    assert message.startswith(f"{path}:2: not valid JSON (Expecting ',' delimiter at column 9")
    assert "\n" not in message
    assert str(rows[2].error) == f"{path}:3: expected a JSON object, got an array"
    assert str(rows[3].error) == f"{path}:4: expected a JSON object, got a string"
    assert rows[4].data == {"q": 5} and rows[4].line == 5


def test_binary_garbage_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "in.ndjson", b'{"a": 1}\n\x00\xff\xfe\x80garbage\n{"a": 2}\n')
    rows = list(open_rows(path))
    assert len(rows) == 3
    assert isinstance(rows[1].error, InputError)
    assert str(rows[1].error).startswith(f"{path}:2: not valid UTF-8")
    assert rows[2].data == {"a": 2}


def test_reading_is_lazy(tmp_path):
    path = write(tmp_path / "in.jsonl", b'{"n": 1}\n' + b"\xff\xfe garbage {{{\n" * 1000)
    rows = iter(open_rows(path))
    first = next(rows)
    assert first.data == {"n": 1} and first.error is None


class ExplodingStream:
    """A stdin that fails if read past the lines the first row needs."""

    def __init__(self, *lines: bytes) -> None:
        self.lines = lines

    def __iter__(self):
        yield from self.lines
        raise AssertionError("the reader consumed more than it needed")


@pytest.mark.parametrize(
    ("fmt", "lines", "expected"),
    [("jsonl", [b'{"n": 1}\n'], {"n": 1}), ("csv", [b"n,m\n", b"1,2\n"], {"n": "1", "m": "2"})],
)
def test_first_row_needs_only_its_own_lines(fmt, lines, expected):
    rows = iter(open_rows("-", fmt=fmt, stdin=ExplodingStream(*lines)))
    assert next(rows).data == expected
    with pytest.raises(AssertionError, match="consumed more"):
        next(rows)


def test_empty_and_blank_file_yield_nothing(tmp_path):
    assert list(open_rows(write(tmp_path / "empty.jsonl", b""))) == []
    assert list(open_rows(write(tmp_path / "blank.csv", b"\n  \n"))) == []
    assert open_rows(write(tmp_path / "e2.jsonl", b"\n")).count_rows() == 0


def test_ten_megabyte_line(tmp_path):
    big = "x" * (10 * 1024 * 1024)
    path = write(tmp_path / "big.jsonl", json.dumps({"text": big}) + '\n{"text": "small"}\n')
    rows = list(open_rows(path))
    assert len(rows[0].data["text"]) == len(big)
    assert rows[1].data == {"text": "small"}
    csv_path = write(tmp_path / "big.csv", f"text,n\n{big},1\n")
    (row,) = list(open_rows(csv_path))
    assert len(row.data["text"]) == len(big) and row.data["n"] == "1"


def test_missing_path_and_directory_fail_at_open(tmp_path):
    with pytest.raises(InputError, match="no such input file") as missing:
        open_rows(str(tmp_path / "nope.jsonl"))
    assert "\n" not in str(missing.value)
    with pytest.raises(InputError, match="is a directory"):
        open_rows(str(tmp_path))


def test_unknown_format_is_an_argument_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match="xml"):
        open_rows(write(tmp_path / "a.jsonl", "{}\n"), fmt="xml")


def test_count_rows_matches_iteration_and_does_not_disturb_it(tmp_path):
    path = write(tmp_path / "in.jsonl", '{"a": 1}\n\nnot json\n{"a": 3}\n')
    source = open_rows(path)
    rows = iter(source)
    first = next(rows)
    assert source.count_rows() == 3
    rest = list(rows)
    assert first.data == {"a": 1} and [r.line for r in rest] == [3, 4]
    csv_source = open_rows(write(tmp_path / "in.csv", 'a,b\n1,2\n\n"x\ny",3\n4\n'))
    assert csv_source.count_rows() == 3 == len(list(csv_source))


# ----------------------------------------------------------------------------- CSV


def test_csv_rows_quotes_multiline_and_bom(tmp_path):
    text = '\ufeffq, n\n"hello, world",1\n\n"two\nlines",2\n'
    rows = list(open_rows(write(tmp_path / "in.csv", text)))
    assert [r.data for r in rows] == [
        {"q": "hello, world", "n": "1"},
        {"q": "two\nlines", "n": "2"},
    ]
    assert [r.line for r in rows] == [2, 4]


def test_csv_wrong_field_count_and_bad_bytes(tmp_path):
    path = write(tmp_path / "in.csv", b"a,b\n1,2\n1,2,3\n\xff\xfe,2\n5,6\n")
    rows = list(open_rows(path))
    assert [r.line for r in rows] == [2, 3, 4, 5]
    assert str(rows[1].error) == f"{path}:3: expected 2 fields as in the header, got 3"
    assert str(rows[2].error).startswith(f"{path}:4: not valid UTF-8")
    assert rows[3].data == {"a": "5", "b": "6"}


def test_csv_duplicate_header_column(tmp_path):
    path = write(tmp_path / "in.csv", "a,a\n1,2\n")
    with pytest.raises(InputError, match=r"in.csv:1: CSV header repeats the column 'a'"):
        list(open_rows(path))


def test_csv_id_field(tmp_path):
    rows = list(open_rows(write(tmp_path / "in.csv", "rid,q\nr1,x\n,y\n"), id_field="rid"))
    assert [r.id for r in rows] == ["r1", "line-3"]  # an empty id falls back to the line


# ----------------------------------------------------------------------------- stdin


def test_stdin_sniffs_jsonl():
    stream = io.BytesIO(b'\n  {"q": 1}\n{"q": 2}\n')
    source = open_rows("-", stdin=stream)
    assert source.format == "jsonl" and source.count_rows() is None
    rows = list(source)
    assert [r.data for r in rows] == [{"q": 1}, {"q": 2}]
    assert [r.line for r in rows] == [2, 3]
    assert not stream.closed


def test_stdin_sniffs_csv_and_honours_fmt():
    rows = list(open_rows("-", stdin=io.BytesIO(b"q,n\nx,1\n")))
    assert rows[0].data == {"q": "x", "n": "1"}
    forced = list(open_rows("-", fmt="jsonl", stdin=io.BytesIO(b"q,n\n")))
    assert forced[0].error is not None and str(forced[0].error).startswith("<stdin>:1:")


def test_stdin_text_stream_via_sys_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"q": "é"}\n'))
    (row,) = list(open_rows("-"))
    assert row.data == {"q": "é"}


# ----------------------------------------------------------------------------- conversion


def program(s, n: int, ratio: float, flag: bool, tags: list, maybe: Optional[int] = None,
            other: int | None = 5, free=None, name: str = "x"):  # fmt: skip
    pass


def specs():
    return param_specs(program)


def test_param_specs_skip_state_and_keep_defaults():
    result = specs()
    assert [p.name for p in result] == [
        "n", "ratio", "flag", "tags", "maybe", "other", "free", "name",
    ]  # fmt: skip
    assert result[0] == ParamSpec("n", int, False, None)
    assert result[-1] == ParamSpec("name", str, True, "x")
    assert result[6].annotation is None


def test_convert_csv_strings():
    row = {"n": "3", "ratio": "0.5", "flag": "Yes", "tags": '["a", "b"]', "maybe": "", "name": "z"}
    assert convert_row(row, specs()) == {
        "n": 3, "ratio": 0.5, "flag": True, "tags": ["a", "b"], "maybe": None, "name": "z",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("no", False), ("YES", True)],
)
def test_bool_words(text, expected):
    base = {"n": 1, "ratio": 1, "tags": []}
    assert convert_row({**base, "flag": text}, specs())["flag"] is expected


def test_json_values_pass_through_and_optional():
    row = {"n": 2, "ratio": 1, "flag": False, "tags": [1], "other": None, "free": {"k": 1}}
    out = convert_row(row, specs())
    assert out["ratio"] == 1.0 and isinstance(out["ratio"], float)
    assert out["other"] is None and out["free"] == {"k": 1}
    assert convert_row({**row, "other": "7"}, specs())["other"] == 7


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [("n", "abc", "int"), ("flag", "maybe", "bool"), ("tags", "{bad json", "list"),
     ("n", True, "int"), ("ratio", [1], "float"), ("maybe", "x", "int | None")],
)  # fmt: skip
def test_wrong_types_name_column_value_and_type(column, value, expected):
    row = {"n": 1, "ratio": 1, "flag": True, "tags": [], column: value}
    with pytest.raises(InputError) as info:
        convert_row(row, specs(), source="in.csv:4")
    message = str(info.value)
    assert message.startswith(f"in.csv:4: column {column!r}: expected {expected}, got ")
    assert repr(value)[:20] in message


def test_long_value_is_truncated():
    row = {"n": "y" * 500, "ratio": 1, "flag": True, "tags": []}
    with pytest.raises(InputError) as info:
        convert_row(row, specs())
    assert "y" * 30 in str(info.value) and "y" * 50 not in str(info.value)


def test_missing_required_parameter():
    with pytest.raises(InputError, match=r"missing required argument\(s\): flag, tags"):
        convert_row({"n": 1, "ratio": 1}, specs(), source="x:1")


def test_unknown_columns_strict_and_lenient():
    row = {"n": 1, "ratio": 1, "flag": True, "tags": [], "extra": 1, "rid": "a"}
    out = convert_row(row, specs(), id_field="rid")
    assert "extra" not in out and "rid" not in out
    with pytest.raises(InputError, match="unknown column.*'extra'") as info:
        convert_row(row, specs(), strict=True, id_field="rid")
    assert "'rid'" not in str(info.value)  # the id column is known
    del row["extra"]
    assert convert_row(row, specs(), strict=True, id_field="rid")["n"] == 1


def test_id_field_that_is_a_parameter_is_passed():
    out = convert_row({"n": "4", "ratio": 1, "flag": 1, "tags": []}, specs(), id_field="n")
    assert out["n"] == 4


def test_mapping_renames_columns():
    row = {"count": "9", "ratio": 1, "flag": "no", "tags": "[]", "n": "ignored"}
    out = convert_row(row, specs(), mapping={"n": "count"})
    assert out["n"] == 9
    with pytest.raises(InputError, match="unknown column.*'n'"):
        convert_row(row, specs(), mapping={"n": "count"}, strict=True)
    with pytest.raises(InputError, match=r"n \(column 'cnt'\)"):
        convert_row(row, specs(), mapping={"n": "cnt"})
    with pytest.raises(InvalidArgumentError, match="nosuch"):
        convert_row(row, specs(), mapping={"nosuch": "count"})


def test_empty_cell_keeps_default_for_non_string_parameter():
    row = {"n": 1, "ratio": 1, "flag": True, "tags": [], "other": "", "name": ""}
    out = convert_row(row, specs())
    assert out["other"] is None  # Optional: empty means None
    assert out["name"] == ""  # a string parameter takes the empty string


def test_string_annotations_from_future_import():
    namespace: dict = {}
    exec(
        "from __future__ import annotations\ndef f(s, a: int, b: list[str] | None = None): pass\n",
        namespace,
    )
    out = convert_row({"a": "2", "b": '["x"]'}, param_specs(namespace["f"]))
    assert out == {"a": 2, "b": ["x"]}


def test_end_to_end_csv_rows_to_kwargs(tmp_path):
    path = write(tmp_path / "in.csv", "n,ratio,flag,tags\n1,0.5,true,[]\nx,1,true,[]\n")
    params = specs()
    results = []
    for row in open_rows(path):
        try:
            results.append(convert_row(row.data, params, source=f"{path}:{row.line}"))
        except InputError as exc:
            results.append(str(exc))
    assert results[0]["flag"] is True
    assert results[1].startswith(f"{path}:3: column 'n': expected int")
