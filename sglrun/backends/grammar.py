"""Grammars for llama.cpp's constrained decoding.

``regex_grammar(pattern)`` turns a Python regular expression into a grammar the embedded engine
enforces token by token: an LLGuidance grammar (``%llguidance`` + a lark rule holding one
regex) when the engine has LLGuidance, else GBNF. The pattern is parsed with Python's own
parser (``re._parser``), so it means exactly what it means to ``re``, and re-emitted in a
normalised form. Following SGLang's grammar backends, ``\\d``, ``\\w`` and ``\\s`` are the ASCII
classes (``[0-9]``, ``[A-Za-z0-9_]``, ``[ \\t\\n\\r\\f\\v]``), so every output also matches the
pattern under Python's Unicode rules. Anchors are accepted only at the ends (the whole output
is matched anyway); look-around, back-references and word boundaries cannot be expressed and
raise ``UnsupportedCapabilityError``.

``json_schema_grammar`` is the LLGuidance grammar of a JSON schema. llama.cpp quietly falls
back to unconstrained text when LLGuidance rejects a grammar, so ``llguidance_probe`` builds a
cheap test request that shows whether it compiled. ``token_grammar`` forces one exact token
sequence (GBNF), which is how ``select`` and prompt logprobs are measured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from sglrun.errors import InvalidArgumentError, UnsupportedCapabilityError

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "LLGUIDANCE_PREFIX",
    "PROBE_MARK",
    "json_schema_grammar",
    "llguidance_grammar",
    "llguidance_probe",
    "regex_grammar",
    "regex_to_gbnf",
    "regex_to_llguidance",
    "strict_json_schema",
    "token_grammar",
]

LLGUIDANCE_PREFIX = "%llguidance {}\n"
PROBE_MARK = "zqxj"
MAX_CODEPOINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_BACKEND = "embedded llama.cpp"

Ranges = tuple[tuple[int, int], ...]

_DIGIT: Ranges = ((0x30, 0x39),)
_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20))
_NEWLINE: Ranges = ((0x0A, 0x0A),)


# --- a small regex AST ---------------------------------------------------------------------


@dataclass(frozen=True)
class CharSet:
    ranges: Ranges  # sorted, disjoint, non-adjacent, never containing surrogates


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    low: int
    high: int | None  # None = unbounded


Node = Union[CharSet, Seq, Alt, Repeat]


def _normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out: list[tuple[int, int]] = []
    for lo, hi in merged:  # cut the surrogate block out: no engine accepts lone surrogates
        if hi < _SURROGATES[0] or lo > _SURROGATES[1]:
            out.append((lo, hi))
            continue
        if lo < _SURROGATES[0]:
            out.append((lo, _SURROGATES[0] - 1))
        if hi > _SURROGATES[1]:
            out.append((_SURROGATES[1] + 1, hi))
    return tuple(out)


def _complement(ranges: Ranges) -> Ranges:
    """Every other code point, NUL excepted (no model writes it; GBNF cannot match it)."""
    out, start = [], 1
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return _normalize(out)


def _fold_case(ranges: Ranges) -> Ranges:
    """Add the other case of every letter (ASCII ranges fast, other small ranges per char)."""
    extra: list[tuple[int, int]] = []
    for lo, hi in ranges:
        for a, z, shift in ((0x61, 0x7A, -32), (0x41, 0x5A, 32)):
            x, y = max(lo, a), min(hi, z)
            if x <= y:
                extra.append((x + shift, y + shift))
        if hi >= 0x80 and hi - lo < 512:
            for cp in range(max(lo, 0x80), hi + 1):
                for other in {chr(cp).lower(), chr(cp).upper()}:
                    if len(other) == 1:
                        extra.append((ord(other), ord(other)))
    return _normalize(list(ranges) + extra)


# --- Python regex -> AST ---------------------------------------------------------------------


def _unsupported(what: str, pattern: str) -> UnsupportedCapabilityError:
    return UnsupportedCapabilityError(
        f"regex {what}",
        _BACKEND,
        f"{pattern!r} cannot be enforced token by token; rewrite it without {what}",
    )


class _Converter:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def char(self, cp: int, flags: int) -> CharSet:
        ranges = _normalize([(cp, cp)])
        if not ranges:
            raise _unsupported("surrogate code points", self.pattern)
        return CharSet(_fold_case(ranges) if flags & re.IGNORECASE else ranges)

    def category(self, name: object) -> Ranges:
        table = {
            _sre.CATEGORY_DIGIT: _DIGIT,
            _sre.CATEGORY_WORD: _WORD,
            _sre.CATEGORY_SPACE: _SPACE,
        }
        negated = {
            _sre.CATEGORY_NOT_DIGIT: _DIGIT,
            _sre.CATEGORY_NOT_WORD: _WORD,
            _sre.CATEGORY_NOT_SPACE: _SPACE,
        }
        if name in table:
            return table[name]
        if name in negated:
            return _complement(negated[name])
        raise _unsupported(f"category {name}", self.pattern)  # pragma: no cover

    def charset(self, items: list, flags: int) -> CharSet:
        ranges: list[tuple[int, int]] = []
        negate = False
        for op, av in items:
            if op is _sre.NEGATE:
                negate = True
            elif op is _sre.LITERAL:
                ranges.append((av, av))
            elif op is _sre.RANGE:
                ranges.append((av[0], av[1]))
            elif op is _sre.CATEGORY:
                ranges.extend(self.category(av))
            else:  # pragma: no cover - the parser emits nothing else inside [...]
                raise _unsupported(f"class item {op}", self.pattern)
        result = _normalize(ranges)
        if flags & re.IGNORECASE:
            result = _fold_case(result)
        return CharSet(_complement(result) if negate else result)

    def sequence(self, items: Iterable, flags: int) -> Node:
        nodes = [self.node(op, av, flags) for op, av in items]
        nodes = [n for n in nodes if not (isinstance(n, Seq) and not n.items)]
        return nodes[0] if len(nodes) == 1 else Seq(tuple(nodes))

    def node(self, op: object, av: object, flags: int) -> Node:
        if op is _sre.LITERAL:
            return self.char(av, flags)  # type: ignore[arg-type]
        if op is _sre.NOT_LITERAL:
            return CharSet(_complement(self.char(av, flags).ranges))  # type: ignore[arg-type]
        if op is _sre.ANY:
            return CharSet(_complement(()) if flags & re.DOTALL else _complement(_NEWLINE))
        if op is _sre.IN:
            return self.charset(av, flags)  # type: ignore[arg-type]
        if op is _sre.BRANCH:
            return Alt(tuple(self.sequence(branch, flags) for branch in av[1]))  # type: ignore[index]
        if op is _sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av  # type: ignore[misc]
            return self.sequence(sub, (flags | add_flags) & ~del_flags)
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT) or op is getattr(
            _sre, "POSSESSIVE_REPEAT", None
        ):
            low, high, sub = av  # type: ignore[misc]
            high = None if high == _sre.MAXREPEAT else high
            return Repeat(self.sequence(sub, flags), low, high)
        if op is getattr(_sre, "ATOMIC_GROUP", None):
            return self.sequence(av, flags)  # type: ignore[arg-type]
        if op is _sre.AT and av in (_sre.AT_BOUNDARY, _sre.AT_NON_BOUNDARY):
            raise _unsupported("word boundaries (\\b, \\B)", self.pattern)
        if op is _sre.AT:
            raise _unsupported(
                "anchors inside the pattern (only a leading ^ or trailing $)", self.pattern
            )
        if op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise _unsupported("back-references", self.pattern)
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            raise _unsupported("look-around assertions", self.pattern)
        raise _unsupported(f"construct {op}", self.pattern)  # pragma: no cover


def parse_regex(pattern: str) -> Node:
    """Parse a Python regex into the small AST both renderers use."""
    if not isinstance(pattern, str):
        raise InvalidArgumentError(f"regex must be a str, not {type(pattern).__name__}")
    try:
        parsed = _sre_parse.parse(pattern, 0)
    except re.error as exc:
        raise InvalidArgumentError(f"invalid regex {pattern!r}: {exc}") from None
    items = list(parsed)
    starts = (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING)
    ends = (_sre.AT_END, _sre.AT_END_STRING)
    while items and items[0][0] is _sre.AT and items[0][1] in starts:
        items.pop(0)
    while items and items[-1][0] is _sre.AT and items[-1][1] in ends:
        items.pop()
    return _Converter(pattern).sequence(items, parsed.state.flags)


# --- rendering ---------------------------------------------------------------------------------


def _rx_char(cp: int) -> str:
    ch = chr(cp)
    return ch if ch.isascii() and ch.isalnum() else f"\\x{{{cp:X}}}"


def _rx(node: Node) -> str:
    if isinstance(node, CharSet):
        if len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1]:
            return _rx_char(node.ranges[0][0])
        if not node.ranges:
            raise _unsupported("empty character classes", "")
        body = "".join(
            _rx_char(lo) if lo == hi else f"{_rx_char(lo)}-{_rx_char(hi)}" for lo, hi in node.ranges
        )
        return f"[{body}]"
    if isinstance(node, Seq):
        return "".join(_rx(item) for item in node.items)
    if isinstance(node, Alt):
        return "(?:" + "|".join(_rx(option) for option in node.options) + ")"
    return f"(?:{_rx(node.item)}){_quantifier(node.low, node.high)}"


def _quantifier(low: int, high: int | None) -> str:
    if (low, high) == (0, None):
        return "*"
    if (low, high) == (1, None):
        return "+"
    if (low, high) == (0, 1):
        return "?"
    if high is None:
        return f"{{{low},}}"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"


def _gbnf_char(cp: int) -> str:
    ch = chr(cp)
    if ch.isascii() and (ch.isalnum() or ch == " "):
        return ch
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def _gbnf(node: Node) -> str:
    if isinstance(node, CharSet):
        if len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1]:
            return '"' + _gbnf_char(node.ranges[0][0]) + '"'
        if not node.ranges:
            raise _unsupported("empty character classes", "")
        body = "".join(
            _gbnf_char(lo) if lo == hi else f"{_gbnf_char(lo)}-{_gbnf_char(hi)}"
            for lo, hi in node.ranges
        )
        return f"[{body}]"
    if isinstance(node, Seq):
        return "(" + " ".join(_gbnf(item) for item in node.items) + ")" if node.items else '""'
    if isinstance(node, Alt):
        return "(" + " | ".join(_gbnf(option) for option in node.options) + ")"
    return f"({_gbnf(node.item)}){_quantifier(node.low, node.high)}"


def llguidance_grammar(body: str) -> str:
    """An LLGuidance grammar of one rule, ``start: <body>`` (a /regex/ or a %json schema)."""
    return f"{LLGUIDANCE_PREFIX}start: {body}"


def llguidance_probe(grammar: str) -> str:
    """``grammar`` behind the fixed marker ``PROBE_MARK``. llama.cpp silently generates
    unconstrained text when it cannot compile an LLGuidance grammar, so the output of this
    probe starts with the marker exactly when the grammar compiled."""
    head = f"{LLGUIDANCE_PREFIX}start: "
    if not grammar.startswith(head) or "\n" in grammar[len(head) :]:
        raise ValueError("not a one-rule LLGuidance grammar")
    return f'{head}"{PROBE_MARK}" checked\nchecked: {grammar[len(head) :]}'


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_ONES = ("items", "additionalItems", "not", "if", "then", "else", "contains")


def strict_json_schema(schema: Any) -> Any:
    """``schema`` with SGLang's default (xgrammar's strict mode): an object schema listing
    ``properties`` admits no others unless it says so, so a small model cannot ramble into
    keys nobody asked for. A schema that sets ``additionalProperties`` (or
    ``patternProperties``/``unevaluatedProperties``) keeps its own rule, and a bare
    ``{"type": "object"}`` still means any object. Never mutates ``schema``."""
    if isinstance(schema, list):
        return [strict_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_json_schema(item) for item in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_json_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_ONES:
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict_json_schema(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_json_schema(out["additionalProperties"])
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if "properties" in out and not any(key in out for key in open_keys):
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: object, *, compact: bool = True) -> str:
    """An LLGuidance grammar for JSON values valid under ``schema``. ``compact``: the
    separators are exactly ``", "`` and ``": "`` and no other whitespace is allowed
    (LLGuidance's ``whitespace_flexible: false``), so a model cannot pad its JSON with
    blank lines until ``max_tokens`` cuts it."""
    if compact and isinstance(schema, dict):
        options = dict(schema.get("x-guidance") or {})
        options.setdefault("whitespace_flexible", False)
        schema = {**schema, "x-guidance": options}
    return llguidance_grammar("%json " + json.dumps(schema))


def regex_to_llguidance(pattern: str) -> str:
    """An LLGuidance grammar whose whole output must match ``pattern``."""
    return llguidance_grammar(f"/{_rx(parse_regex(pattern))}/")


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar whose whole output must match ``pattern``."""
    return f"root ::= {_gbnf(parse_regex(pattern))}"


def regex_grammar(pattern: str, *, llguidance: bool = True) -> str:
    return regex_to_llguidance(pattern) if llguidance else regex_to_gbnf(pattern)


def token_grammar(token_ids: Iterable[int]) -> str:
    """A GBNF grammar admitting exactly this token sequence."""
    ids = list(token_ids)
    return "root ::= " + (" ".join(f"<[{int(i)}]>" for i in ids) if ids else '""')
