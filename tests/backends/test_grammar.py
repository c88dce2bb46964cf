"""Python regex -> LLGuidance / GBNF conversion (no model needed).

The LLGuidance form is a regex in Rust syntax; translated back into Python syntax it must
accept exactly the strings the original pattern accepts (on ASCII text, where SGLang's ASCII
``\\d \\w \\s`` and Python's Unicode ones agree).
"""

from __future__ import annotations

import itertools
import json
import re

import pytest

from sglrun.backends.grammar import (
    LLGUIDANCE_PREFIX,
    PROBE_MARK,
    json_schema_grammar,
    llguidance_probe,
    regex_grammar,
    regex_to_gbnf,
    regex_to_llguidance,
    strict_json_schema,
    token_grammar,
)
from sglrun.errors import InvalidArgumentError, UnsupportedCapabilityError
from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

PATTERNS = [
    r"(19|20)[0-9]{2}",
    r"[A-Z][a-z]+ [a-z]+",
    r"\w+@\w+\.com",
    r"^a.b$",
    r"\Aab\Z",
    r"[^abc]{2,}?",
    r"(?i)yes|no",
    r"(?i:[a-c])x",
    r"\d{3}-\d{4}",
    r"[\D]x",
    r"[^\W\d]+",
    r"(a|)b*",
    r"a{2}b{1,3}c{2,}",
    r"[\s\S]",
    r"(?s:.)",
    r"(?s).",
    r".",
    r"[a-c-]+",
    r"\.\*\+\?\(\)\[\]\{\}\|\\\^\$/",
    r"(?:ab)+|c?",
    r"a++b",
    r"(?>ab|a)c",
    r"[\n\t ]*",
    REGEX_INT,
    REGEX_FLOAT,
    REGEX_BOOL,
    REGEX_STR,
]

ALPHABET = "aAbBcC019 _-.\n@"
SHORT = ["".join(p) for n in range(4) for p in itertools.product(ALPHABET, repeat=n)]
EXTRA = [
    "1999", "2024", "1899", "209", "20245", "Light blue", "Light Blue", "light blue",
    "bob@mail.com", "b@m.co", "a\nb", "a-b", "YES", "No", "nope", "555-1234", "55-1234",
    "aabbbcc", "aabbbbcc", "aabc", "True", "False", "-12 \n", "+3.5", ".5", '"hi there 42"',
    '"a-b"', r".*+?()[]{}|\^$/", "ababab", "abc", "ac",
]  # fmt: skip


def _as_python(llguidance: str) -> str:
    assert llguidance.startswith(LLGUIDANCE_PREFIX + "start: /") and llguidance.endswith("/")
    body = llguidance[len(LLGUIDANCE_PREFIX + "start: /") : -1]
    assert "/" not in body  # nothing can end the lark regex early
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: f"\\U{int(m[1], 16):08X}", body)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_llguidance_regex_accepts_the_same_strings(pattern):
    original = re.compile(pattern)
    converted = re.compile(_as_python(regex_to_llguidance(pattern)))
    for text in SHORT + EXTRA:
        if pattern.endswith("$") and text.endswith("\n"):
            continue  # Python's $ also matches before a final newline; the output is whole
        expected = original.fullmatch(text) is not None
        assert (converted.fullmatch(text) is not None) == expected, (pattern, text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gbnf_is_well_formed(pattern):
    grammar = regex_to_gbnf(pattern)
    assert grammar.startswith("root ::= ")
    assert grammar.count("(") == grammar.count(")")
    assert "\\x00" not in grammar  # NUL cannot appear in a GBNF class


def test_examples():
    assert regex_to_llguidance(r"(19|20)[0-9]{2}").endswith("/(?:19|20)(?:[0-9]){2}/")
    assert regex_to_gbnf(r"(19|20)[0-9]{2}") == 'root ::= ((("1" "9") | ("2" "0")) ([0-9]){2})'
    assert regex_to_gbnf("a+b?") == 'root ::= (("a")+ ("b")?)'
    assert regex_to_gbnf(r"\d") == "root ::= [0-9]"
    assert regex_to_gbnf("é") == 'root ::= "\\xE9"'
    assert regex_grammar("a", llguidance=False) == regex_to_gbnf("a")
    assert regex_grammar("a") == regex_to_llguidance("a")


def test_ascii_classes_like_sglang():
    body = _as_python(regex_to_llguidance(r"\w\d\s"))
    assert re.fullmatch(body, "a1 ")
    assert not re.fullmatch(body, "é1 ")  # \w is [A-Za-z0-9_], as in SGLang's grammar backends
    assert not re.fullmatch(body, "a٣ ")


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        (r"(a)\1", "back-references"),
        (r"a(?=b)", "look-around"),
        (r"(?<!a)b", "look-around"),
        (r"\bword\b", "word boundaries"),
        (r"a^b", "anchors"),
        (r"a$b", "anchors"),
        (r"(a)?(?(1)b|c)", "back-references"),
    ],
)
def test_unsupported_constructs(pattern, what):
    with pytest.raises(UnsupportedCapabilityError, match=what):
        regex_to_llguidance(pattern)
    with pytest.raises(UnsupportedCapabilityError):
        regex_to_gbnf(pattern)


def test_invalid_patterns():
    with pytest.raises(InvalidArgumentError, match="invalid regex"):
        regex_to_llguidance("(")
    with pytest.raises(InvalidArgumentError):
        regex_to_llguidance(b"a")  # type: ignore[arg-type]


def test_token_grammar():
    assert token_grammar([1, 42]) == "root ::= <[1]> <[42]>"
    assert token_grammar([]) == 'root ::= ""'


def test_compact_json_adds_guidance_options_without_losing_the_schemas_own():
    grammar = json_schema_grammar({"type": "object", "x-guidance": {"lenient": True}})
    body = json.loads(grammar.split("%json ", 1)[1])
    assert body["x-guidance"] == {"lenient": True, "whitespace_flexible": False}


def test_strict_json_schema_closes_listed_objects_only():
    schema = {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"b": {"type": "integer"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
            "rows": {"type": "array", "items": {"properties": {"x": {}}}},
            "any": {"type": "object"},
        },
        "$defs": {"d": {"properties": {"y": {}}}},
        "anyOf": [{"properties": {"z": {}}}],
    }
    strict = strict_json_schema(schema)
    assert strict["additionalProperties"] is False
    props = strict["properties"]
    assert props["inner"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True
    assert props["rows"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in props["any"]
    assert strict["$defs"]["d"]["additionalProperties"] is False
    assert strict["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone


def test_json_schema_grammar_and_probe():
    grammar = json_schema_grammar({"type": "object", "required": ["a"]}, compact=False)
    assert grammar == LLGUIDANCE_PREFIX + 'start: %json {"type": "object", "required": ["a"]}'
    probe = llguidance_probe(grammar)
    assert probe == (
        f'{LLGUIDANCE_PREFIX}start: "{PROBE_MARK}" checked\n'
        'checked: %json {"type": "object", "required": ["a"]}'
    )
    assert llguidance_probe(regex_to_llguidance("a")).endswith("checked: /a/")
    with pytest.raises(ValueError):
        llguidance_probe("root ::= [a]")
