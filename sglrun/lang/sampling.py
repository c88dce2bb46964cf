"""The one table of sampling parameters' rules: what ``gen``, ``run``, ``run_batch`` and
the settings files and flags of the command line accept (SGLang's own bounds)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sglrun.errors import InvalidArgumentError

__all__ = ["SAMPLING_RULES", "check_sampling", "sampling_problem"]

_NUMBER = (int, float)
# name -> (accepted types, check, description)
SAMPLING_RULES: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "max_new_tokens": ((int,), lambda v: v >= 0, "an int >= 0"),
    "max_tokens": ((int,), lambda v: v >= 0, "an int >= 0"),
    "min_new_tokens": ((int,), lambda v: v >= 0, "an int >= 0"),
    "min_tokens": ((int,), lambda v: v >= 0, "an int >= 0"),
    "n": ((int,), lambda v: v >= 1, "an int >= 1"),
    "stop": ((str, list, tuple), lambda v: True, "a str or a list of str"),
    "stop_token_ids": ((list, tuple), lambda v: True, "a list of int"),
    "stop_regex": ((str, list, tuple), lambda v: True, "a str or a list of str"),
    "temperature": (_NUMBER, lambda v: 0 <= v < math.inf, "a number >= 0 (not infinity)"),
    "top_p": (_NUMBER, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": ((int,), lambda v: v == -1 or v >= 1, "-1 or an int >= 1"),
    "min_p": (_NUMBER, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "frequency_penalty": (_NUMBER, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "presence_penalty": (_NUMBER, lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "ignore_eos": ((bool,), lambda v: True, "a bool"),
    "return_logprob": ((bool,), lambda v: True, "a bool"),
    "logprob_start_len": ((int,), lambda v: True, "an int"),
    "top_logprobs_num": ((int,), lambda v: v >= 0, "an int >= 0"),
    "return_text_in_logprobs": ((bool,), lambda v: True, "a bool"),
}


def sampling_problem(key: str, value: Any) -> str | None:
    """What ``value`` must be for the sampling parameter ``key``; None if it is fine (or
    ``key`` is not a sampling parameter)."""
    if value is None or key not in SAMPLING_RULES:
        return None
    types, ok, description = SAMPLING_RULES[key]
    bad_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    if bad_type or not ok(value):
        return description
    if key in ("stop", "stop_regex") and not isinstance(value, str):
        if not all(isinstance(item, str) for item in value):
            return "a str or a list of str"
    if key == "stop_token_ids" and not all(type(item) is int for item in value):
        return "a list of int"
    return None


def check_sampling(where: str, values: dict[str, Any]) -> None:
    """Fail at the call, with one clear line, on a wrongly typed sampling value."""
    for key, value in values.items():
        problem = sampling_problem(key, value)
        if problem is not None:
            raise InvalidArgumentError(f"{where}: {key} must be {problem}, not {value!r}")
