"""Every example program on every server backend: the SGLang and Anthropic stubs, and the
OpenAI-compatible API of a real llama.cpp server. A program either runs and fills every
variable its dry run names, or fails with one clear line naming the missing capability and
the backend."""

from __future__ import annotations

from pathlib import Path

import pytest
from anthropic_stub import AnthropicStub
from sglang_stub import SGLangStub

from sglrun.backends.anthropic import Anthropic
from sglrun.backends.openai import OpenAI
from sglrun.backends.runtime_endpoint import RuntimeEndpoint
from sglrun.batch.convert import convert_row, param_specs
from sglrun.batch.readers import open_rows
from sglrun.cli.loader import load_program
from sglrun.errors import UnsupportedCapabilityError

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = sorted(p.stem for p in (ROOT / "programs").glob("*.py"))
DATA = {p.stem: p for p in (ROOT / "sample_data").iterdir() if p.suffix in (".jsonl", ".csv")}


def first_row(name: str, fn) -> dict:
    row = next(iter(open_rows(str(DATA[name]))))
    specs = param_specs(fn.func)
    return convert_row(row.data, specs, id_field="id")


def check(name: str, backend, backend_label: str) -> str:
    fn = load_program(str(ROOT / "programs" / f"{name}.py"))
    row = first_row(name, fn)
    expected = set(fn.trace(**row).variables()) - set(row)
    state = fn.run(backend=backend, temperature=0, max_new_tokens=16, **row)
    error = state.error()
    if error is None:
        assert expected <= set(state.variables()), (name, expected, state.variables())
        return "ok"
    assert isinstance(error, UnsupportedCapabilityError), (name, repr(error))
    assert backend_label in str(error) and "\n" not in str(error)
    return "unsupported"


def test_every_program_has_sample_data():
    assert PROGRAMS and all(name in DATA for name in PROGRAMS)


@pytest.fixture(scope="module")
def sglang():
    server = SGLangStub()
    yield RuntimeEndpoint(server.url)
    server.stop()


@pytest.mark.parametrize("name", PROGRAMS)
def test_programs_on_sglang_runtime(name, sglang):
    assert check(name, sglang, "SGLang") == "ok"  # the native API lacks nothing they use


@pytest.fixture(scope="module")
def claude():
    server = AnthropicStub(api_key="sk-ant-test")
    yield Anthropic("claude-test", api_key="sk-ant-test", base_url=server.url)
    server.stop()


def test_programs_on_anthropic(claude):
    outcomes = {name: check(name, claude, "Anthropic") for name in PROGRAMS}
    assert outcomes["summarize"] == "ok" and outcomes["chat"] == "ok"
    assert outcomes["extract"] == "unsupported"  # regex and json_schema


@pytest.mark.model
def test_programs_on_openai_compatible_llamacpp(llamacpp_server):
    chat = OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=True)
    completion = OpenAI("smollm2", base_url=llamacpp_server[0], is_chat_model=False)
    outcomes = {name: check(name, chat, "OpenAI") for name in PROGRAMS}
    for name in ("summarize", "chat", "classify", "extract"):
        assert outcomes[name] == "ok", (name, outcomes)
    assert check("few_shot_qa", completion, "OpenAI") == "ok"
    assert check("capital_fact", completion, "OpenAI") == "ok"
