"""Constraint helpers shared by the HTTP backends.

* ``apply_dtype``: SGLang's typed ``gen`` (``dtype=int`` ...) as a regex, the way SGLang's
  RuntimeEndpoint does it.
* ``regex_to_gbnf``: a regex (the subset constrained decoders accept) as a llama.cpp GBNF
  grammar. ``sglrun.backends.grammar.regex_to_gbnf`` is used instead when it exists.
* ``literal_gbnf`` / ``choices_gbnf`` / ``token_gbnf``: grammars that force one of some
  strings, or an exact token sequence (llama.cpp's ``<[id]>`` token syntax).
* ``match_choice``: map free generated text onto one of the choices of a ``select``.
* ``openai_logprobs``, ``strip_prefill``, ``PrefillStripper``: reading OpenAI-style answers.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Sequence
from typing import Any

from sglrun.errors import InvalidArgumentError, UnsupportedCapabilityError
from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SamplingParams

__all__ = [
    "PrefillStripper",
    "apply_dtype",
    "choices_gbnf",
    "literal_gbnf",
    "match_choice",
    "openai_logprobs",
    "regex_to_gbnf",
    "strip_prefill",
    "token_gbnf",
]

_DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "str": REGEX_STR, "bool": REGEX_BOOL}


def apply_dtype(params: SamplingParams) -> SamplingParams:
    """A copy of ``params`` whose ``dtype`` became a ``regex`` (int and float also stop at a
    space or newline), as SGLang's RuntimeEndpoint does; ``params`` itself when no dtype."""
    if params.dtype is None:
        return params
    regex = _DTYPE_REGEX.get(params.dtype)
    if regex is None:
        raise InvalidArgumentError(f"dtype must be int, float, bool or str, not {params.dtype!r}")
    if params.regex is not None:
        warnings.warn(
            f"both dtype and regex are set; only dtype is used (dtype={params.dtype}, "
            f"regex={params.regex})",
            stacklevel=3,
        )
    out = dataclasses.replace(params, regex=regex, dtype=None)
    if params.dtype in ("int", "float"):
        out = out.with_extra_stop([" ", "\n"])
    return out


# ---------------------------------------------------------------- GBNF literals
def _gbnf_char(ch: str, in_class: bool) -> str:
    code = ord(ch)
    specials = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
    if ch in specials:
        return specials[ch]
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if in_class and ch in "]^-[":
        return f"\\x{code:02X}"
    if not in_class and ch == '"':
        return '\\"'
    return ch


def literal_gbnf(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_gbnf_char(c, False) for c in text) + '"'


def choices_gbnf(choices: Sequence[str]) -> str:
    """A grammar whose only sentences are the ``choices``: ``root ::= "A" | "B"``."""
    alternatives = [literal_gbnf(c) for c in choices if c] or ['""']
    return "root ::= " + " | ".join(alternatives)


def token_gbnf(token_ids: Sequence[int]) -> str:
    """A grammar forcing exactly these token ids (llama.cpp's ``<[id]>`` syntax)."""
    if not token_ids:
        return 'root ::= ""'
    return "root ::= " + " ".join(f"<[{int(t)}]>" for t in token_ids)


# ----------------------------------------------------------------- regex -> GBNF
_DIGIT = [("0", "9")]
_WORD = [("a", "z"), ("A", "Z"), ("0", "9"), ("_", "_")]
_SPACE = [(" ", " "), ("\t", "\t"), ("\n", "\n"), ("\r", "\r"), ("\x0b", "\x0b"), ("\x0c", "\x0c")]
_SHORTHAND = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False),
              "W": (_WORD, True), "s": (_SPACE, False), "S": (_SPACE, True)}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\x0c", "v": "\x0b", "0": "\0"}


def _unsupported(pattern: str, what: str) -> UnsupportedCapabilityError:
    return UnsupportedCapabilityError(
        "regex", "OpenAI", f"{what} in {pattern!r} cannot be turned into a llama.cpp grammar"
    )


class _RegexToGBNF:
    """A recursive-descent reader of a regex that writes GBNF as it goes."""

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def convert(self) -> str:
        body = self.alternation()
        if self.i < len(self.p):
            raise _unsupported(self.p, f"an unmatched {self.p[self.i]!r}")
        return f"root ::= {body or chr(34) * 2}"

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def alternation(self) -> str:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        if len(branches) == 1:
            return branches[0]
        return " | ".join(b or '""' for b in branches)

    def sequence(self) -> str:
        items: list[str] = []
        literal: list[str] = []

        def flush() -> None:
            if literal:
                items.append(literal_gbnf("".join(literal)))
                literal.clear()

        while (ch := self.peek()) is not None and ch not in "|)":
            if ch in "^$" and (self.i == 0 or ch == "$"):
                self.i += 1  # anchors: the grammar always matches the whole output
                continue
            atom, char = self.atom()
            quantifier = self.quantifier()
            if char is not None and not quantifier:
                literal.append(char)
                continue
            flush()
            if char is not None:
                atom = literal_gbnf(char)
            items.append(atom + quantifier)
        flush()
        return " ".join(items)

    def atom(self) -> tuple[str, str | None]:
        """Returns (gbnf, None) or ("", char) for a plain literal character."""
        ch = self.p[self.i]
        if ch == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or self.p.startswith("?<", self.i) and \
                    self.p[self.i + 2 : self.i + 3] not in ("=", "!"):
                self.i = self.p.index(">", self.i) + 1
            elif self.peek() == "?":
                raise _unsupported(self.p, "a lookaround or inline flag group")
            inner = self.alternation()
            if self.peek() != ")":
                raise _unsupported(self.p, "an unclosed group")
            self.i += 1
            return f"({inner or chr(34) * 2})", None
        if ch == "[":
            return self.char_class(), None
        if ch == ".":
            self.i += 1
            return "[^\\n]", None
        if ch == "\\":
            return self.escape()
        if ch in "*+?{" and not (ch == "{" and not self._is_counted()):
            raise _unsupported(self.p, f"a quantifier {ch!r} with nothing before it")
        self.i += 1
        return "", ch

    def escape(self) -> tuple[str, str | None]:
        self.i += 1
        if self.i >= len(self.p):
            raise _unsupported(self.p, "a trailing backslash")
        ch = self.p[self.i]
        self.i += 1
        if ch in _SHORTHAND:
            ranges, negated = _SHORTHAND[ch]
            return self._class_gbnf(ranges, negated), None
        if ch.isdigit() and ch != "0":
            raise _unsupported(self.p, "a backreference")
        if ch in "bBAZzG":
            raise _unsupported(self.p, f"the assertion \\{ch}")
        return "", self._escaped_char(ch)

    def _escaped_char(self, ch: str) -> str:
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        if ch in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[ch]
            digits = self.p[self.i : self.i + width]
            try:
                value = chr(int(digits, 16))
            except ValueError:
                raise _unsupported(self.p, f"a malformed \\{ch} escape") from None
            self.i += width
            return value
        return ch

    def char_class(self) -> str:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges: list[tuple[str, str]] = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise _unsupported(self.p, "an unclosed character class")
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            if ch == "\\":
                self.i += 1
                esc = self.p[self.i] if self.i < len(self.p) else ""
                self.i += 1
                if esc in _SHORTHAND:
                    shorthand, neg = _SHORTHAND[esc]
                    if neg:
                        raise _unsupported(self.p, f"\\{esc} inside a character class")
                    ranges.extend(shorthand)
                    continue
                low = self._escaped_char(esc)
            else:
                if ch == "[" and self.p.startswith("[:", self.i):
                    raise _unsupported(self.p, "a POSIX character class")
                low = ch
                self.i += 1
            high = low
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                high = self.p[self.i]
                self.i += 1
                if high == "\\":
                    esc = self.p[self.i] if self.i < len(self.p) else ""
                    self.i += 1
                    if esc in _SHORTHAND or not esc:
                        raise _unsupported(self.p, "a class shorthand as a range end")
                    high = self._escaped_char(esc)
                if ord(high) < ord(low):
                    raise _unsupported(self.p, "a reversed range")
            ranges.append((low, high))
        return self._class_gbnf(ranges, negated)

    @staticmethod
    def _class_gbnf(ranges: list[tuple[str, str]], negated: bool) -> str:
        parts = []
        for low, high in ranges:
            a = _gbnf_char(low, True)
            parts.append(a if low == high else f"{a}-{_gbnf_char(high, True)}")
        return "[" + ("^" if negated else "") + "".join(parts) + "]"

    def _is_counted(self) -> bool:
        end = self.p.find("}", self.i)
        if end < 0:
            return False
        inner = self.p[self.i + 1 : end]
        return bool(inner) and all(c.isdigit() or c == "," for c in inner) and inner != ","

    def quantifier(self) -> str:
        ch = self.peek()
        if ch is None:
            return ""
        if ch in "*+?":
            self.i += 1
            out = ch
        elif ch == "{" and self._is_counted():
            end = self.p.index("}", self.i)
            inner = self.p[self.i + 1 : end]
            self.i = end + 1
            low, comma, high = inner.partition(",")
            low = low or "0"
            out = "{" + low + ("," + high if comma else "") + "}"
        else:
            return ""
        if self.peek() in ("?", "+"):  # lazy / possessive: same language
            self.i += 1
        return out


def _own_regex_to_gbnf(pattern: str) -> str:
    return _RegexToGBNF(pattern).convert()


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar (``root ::= ...``) accepting what ``pattern`` fully matches. Raises
    ``UnsupportedCapabilityError`` for what a grammar cannot express (backreferences,
    lookaround, word boundaries)."""
    try:
        from sglrun.backends.grammar import regex_to_gbnf as shared  # type: ignore
    except ImportError:
        return _own_regex_to_gbnf(pattern)
    try:
        return shared(pattern)
    except UnsupportedCapabilityError as exc:  # name this backend, keep the converter's reason
        text = str(exc)
        hint = text.split(": ", 1)[1] if ": " in text else text
        raise UnsupportedCapabilityError(exc.capability, "OpenAI", hint) from None


# ----------------------------------------------------------------- choice matching
def _norm(text: str) -> str:
    return text.strip().strip(".!,;:\"'`").strip().casefold()


def match_choice(text: str, choices: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The choice that generated ``text`` means: exact, then the longest choice the text
    starts with (case- and punctuation-insensitive), then the closest by similarity.
    Returns the choice and how it was found."""
    if not choices:
        raise InvalidArgumentError("select needs at least one choice")
    for choice in choices:
        if text == choice:
            return choice, {"text": text, "match": "exact"}
    normalized = _norm(text)
    for choice in choices:
        if normalized == _norm(choice):
            return choice, {"text": text, "match": "normalized"}
    starts = [c for c in choices if _norm(c) and normalized.startswith(_norm(c))]
    if starts:
        return max(starts, key=lambda c: len(_norm(c))), {"text": text, "match": "prefix"}
    scores = [difflib.SequenceMatcher(None, normalized, _norm(c)).ratio() for c in choices]
    best = max(range(len(choices)), key=lambda i: scores[i])
    return choices[best], {"text": text, "match": "closest", "similarity": scores}


# ------------------------------------------------------- reading OpenAI answers
def openai_logprobs(data: Any) -> dict[str, Any]:
    """OpenAI logprobs (chat ``content`` list or legacy completion arrays) as SGLang's
    ``output_token_logprobs`` [(logprob, token_id, text)] and ``output_top_logprobs``."""
    if not isinstance(data, dict):
        return {}
    out: list[list[Any]] = []
    top: list[list[list[Any]]] = []
    if isinstance(data.get("content"), list):
        for entry in data["content"]:
            out.append([entry.get("logprob"), entry.get("id"), entry.get("token")])
            top.append([[t.get("logprob"), t.get("id"), t.get("token")]
                        for t in entry.get("top_logprobs") or []])
    else:
        for token, value in zip(data.get("tokens", []), data.get("token_logprobs", [])):
            out.append([value, None, token])
        for entry in data.get("top_logprobs") or []:
            top.append([[v, None, k] for k, v in (entry or {}).items()])
    return {"output_token_logprobs": out, "output_top_logprobs": top}


def strip_prefill(text: str, prefill: str) -> str:
    """Servers that continue an assistant prefill (llama.cpp) repeat it in the answer."""
    if prefill and text.startswith(prefill):
        return text[len(prefill):]
    return text


class PrefillStripper:
    """Streaming version of ``strip_prefill``: holds text back until it can tell whether the
    answer repeats the prefill."""

    def __init__(self, prefill: str) -> None:
        self.prefill = prefill
        self.pending = ""
        self.decided = not prefill

    def feed(self, piece: str) -> str:
        if self.decided:
            return piece
        self.pending += piece
        if self.pending.startswith(self.prefill):
            self.decided = True
            return self.pending[len(self.prefill):]
        if self.prefill.startswith(self.pending):
            return ""
        self.decided = True
        return self.pending

    def finish(self) -> str:
        if self.decided:
            return ""
        self.decided = True
        return self.pending
