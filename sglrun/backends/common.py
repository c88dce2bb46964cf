"""Pieces every server backend shares: token counts, typed gens as regexes, choice matching.

* ``TokenUsage``: tokens used so far, like SGLang's (thread-safe counters).
* ``apply_dtype``: SGLang's typed ``gen`` (``dtype=int`` ...) as a regex, the way SGLang's
  RuntimeEndpoint does it.
* ``match_choice``: map freely generated text onto one of the choices of a ``select`` (for
  APIs that can neither constrain nor score).
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import orjson

from sglrun.errors import InvalidArgumentError
from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SamplingParams

__all__ = ["TokenUsage", "apply_dtype", "batch_options", "match_choice", "parse_json_schema"]


@dataclasses.dataclass
class TokenUsage:
    """Tokens used so far (thread-safe counters, like SGLang's ``TokenUsage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += int(prompt_tokens or 0)
            self.completion_tokens += int(completion_tokens or 0)

    def reset(self) -> None:
        with self._lock:
            self.prompt_tokens = self.completion_tokens = 0


_DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "str": REGEX_STR, "bool": REGEX_BOOL}


def parse_json_schema(schema: Any) -> Any:
    """A ``json_schema`` parameter as a value (it arrives as JSON text); bad JSON is the
    caller's mistake, said in one line."""
    if not isinstance(schema, (str, bytes)):
        return schema
    try:
        return orjson.loads(schema)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgumentError(f"json_schema is not valid JSON: {exc}") from None


def batch_options(options: Any) -> dict[str, Any]:
    """The batch-API keywords a command line gave (``BackendOptions.extra``), if any."""
    extra = getattr(options, "extra", None) or {}
    keys = ("batch", "batch_jobs", "batch_poll")
    return {key: extra[key] for key in keys if extra.get(key) is not None}


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
