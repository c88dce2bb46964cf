"""The per-row shortcuts of the runtime give what the long way gives: ``gen``'s kept sampling
parameters, ``bind_call`` without inspect, and the resolved parameters a gen sends."""

from __future__ import annotations

import pytest

import sglrun as sgl
from sglrun.errors import InvalidArgumentError
from sglrun.lang.ir import SamplingParams, resolve_sampling


def params_of(expr: object) -> SamplingParams:
    return expr.sampling_params  # type: ignore[attr-defined,no-any-return]


def test_gen_keeps_its_parameters_and_keeps_equal_values_of_other_types_apart():
    first = params_of(sgl.gen("a", max_tokens=8, stop=["\n"], temperature=1))
    assert params_of(sgl.gen("b", max_tokens=8, stop=["\n"], temperature=1)) is first
    assert first.stop == ("\n",) and type(first.temperature) is float  # one request, one key
    as_float = params_of(sgl.gen("c", max_tokens=8, stop=("\n",), temperature=1.0))
    assert as_float == first
    assert params_of(sgl.gen("d", stop_token_ids=[1])).stop_token_ids == (1,)
    with pytest.raises(InvalidArgumentError, match=r"gen\('e'\): stop_token_ids must be"):
        sgl.gen("e", stop_token_ids=[True])  # True == 1, yet it is no token id
    with pytest.raises(InvalidArgumentError, match=r"gen\('f'\): temperature must be"):
        sgl.gen("f", temperature=True)  # and no temperature
    text = params_of(sgl.gen("g", json_schema='{"type":"object"}')).json_schema
    assert text == params_of(sgl.gen("h", json_schema={"type": "object"})).json_schema


def test_gen_checks_every_call_whose_options_fail_and_builds_unhashable_ones_each_time():
    for name in ("one", "two"):  # a failure is never kept: each call names its own gen
        with pytest.raises(InvalidArgumentError, match=rf"gen\('{name}'\): invalid regex"):
            sgl.gen(name, regex="(")
    bad = [{"dtype": list}, {"json_schema": "{"}, {"json_schema": 5}, {"regex": 5},
           {"stop_token_ids": ["a"]}, {"temperature": float("inf")}]  # fmt: skip
    for options in bad:
        with pytest.raises(InvalidArgumentError, match=r"^gen\('v'\): "):
            sgl.gen("v", **options)
    for call in (
        lambda: sgl.select("v", ["a"], True),
        lambda: sgl.gen("v", choices=["a"], temperature=True),
    ):
        with pytest.raises(InvalidArgumentError, match=r"select\('v'\): temperature must be"):
            call()
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    first = params_of(sgl.gen("s", json_schema=schema))
    schema["properties"]["y"] = {"type": "string"}  # a dict may change between calls
    second = params_of(sgl.gen("s", json_schema=schema))
    assert first.json_schema is not None and '"y"' not in first.json_schema
    assert second.json_schema is not None and '"y"' in second.json_schema


@sgl.function
def program(s, question: str, style: str = "short", *, depth: int = 1):
    s += question + style + str(depth)


@sgl.function
def open_program(s, question: str, **extra):
    s += question


def test_bind_call_gives_what_signature_bind_gives():
    assert program.bind_call((), {"depth": 2, "question": "q"}) == {"question": "q", "depth": 2}
    assert list(program.bind_call((), {"depth": 2, "question": "q"})) == ["question", "depth"]
    assert program.bind_call(("q", "long"), {}) == {"question": "q", "style": "long"}
    bound = program.bind(question="bound")
    assert bound.bind_call((), {"style": "x"}) == {"question": "bound", "style": "x"}
    with pytest.raises(InvalidArgumentError, match="missing a required argument: 'question'"):
        program.bind_call((), {"style": "x"})
    with pytest.raises(InvalidArgumentError, match="unexpected keyword argument 'nope'"):
        program.bind_call((), {"question": "q", "nope": 1})
    assert open_program.bind_call((), {"question": "q", "more": 1}) == {
        "question": "q",
        "extra": {"more": 1},
    }


def test_resolved_parameters_are_kept_per_defaults_gen_and_stop_strings():
    gen_params = params_of(sgl.gen("a", max_tokens=8))
    run_one = SamplingParams.defaults(temperature=0.5)
    run_two = SamplingParams.defaults(temperature=0.9)
    stops = ("<|im_end|>",)
    kept = resolve_sampling(run_one, gen_params, stops)
    assert resolve_sampling(run_one, gen_params, stops) is kept
    assert kept == run_one.overridden_by(gen_params).with_extra_stop(stops)
    assert kept.max_new_tokens == 8 and kept.temperature == 0.5 and kept.stop == stops
    other = resolve_sampling(run_two, gen_params, stops)
    assert other.temperature == 0.9
    assert resolve_sampling(run_one, gen_params, ()).stop == ()


@sgl.function
def catch_all(s, a, **extra):
    s += f"{a}|{sorted(extra.items())}|" + sgl.gen("g", max_tokens=1)


@sgl.function
def starred(s, first, *items):
    s += f"{first}{items}" + sgl.gen("g", max_tokens=1)


def test_programs_with_star_args_and_kwargs_get_their_arguments_as_python_would_pass_them():
    from sglrun.backends.fake import FakeBackend

    backend = FakeBackend(["ok"], cycle=True)
    assert catch_all.run(a=1, zz=3, backend=backend).text() == "1|[('zz', 3)]|ok"
    [state] = catch_all.run_batch([{"a": 2, "extra": 5}], backend=backend)
    assert state.text() == "2|[('extra', 5)]|ok"  # a key named like the catch-all is a key
    assert catch_all.trace(a=1, zz=2).text() == "1|[('zz', 2)]|{g}"
    assert starred.run("x", "y", "z", backend=backend).text() == "x('y', 'z')ok"
    [state] = starred.run_batch([["p", "q"]], backend=backend)
    assert state.text() == "p('q',)ok" and state.error() is None
