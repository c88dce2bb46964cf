"""Speculative execution for chat-only models (``@function(num_api_spec_tokens=N)``).

A chat API cannot continue an assistant turn from the middle, so the text and gens of an
assistant turn are collected instead of executed; at the end of the turn the model writes the
whole turn in one call, and the collected template is matched against it: fixed text must
appear in order, each gen takes the text up to the next fixed text (or its own stop string).
The state lives in the program's executor, not in the backend, so concurrent programs never
share it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sglrun.lang.ir import SamplingParams

__all__ = ["SpecTerm", "match_prefix", "match_template"]

MAX_TRIES = 3


@dataclasses.dataclass(slots=True)
class SpecTerm:
    """A piece of an assistant turn: fixed ``text``, or a gen named ``name``."""

    text: str = ""
    name: str | None = None
    params: SamplingParams | None = None
    is_gen: bool = False


def match_template(terms: list[SpecTerm], completion: str) -> dict[int, str] | None:
    """Values for each gen term (by index) if ``completion`` fits the template, else None."""
    values, complete = match_prefix(terms, completion)
    return values if complete else None


def match_prefix(terms: list[SpecTerm], completion: str) -> tuple[dict[int, str], bool]:
    """Values for the gen terms ``completion`` fits, in order up to the first term it does
    not fit (later gens get ""), and whether it fit all of them."""
    values = {index: "" for index, term in enumerate(terms) if term.is_gen}
    position = 0
    for index, term in enumerate(terms):
        if not term.is_gen:
            fixed = term.text.strip()
            if not fixed:
                continue
            found = completion.find(fixed, position)
            if found < 0 or completion[position:found].strip():
                return values, False
            position = found + len(fixed)
            continue
        following = next((t.text.strip() for t in terms[index + 1 :] if not t.is_gen), "")
        found = completion.find(following, position) if following else len(completion)
        end = found if found >= 0 else len(completion)
        stops = [s for s in (term.params.stop if term.params else ()) or () if s]
        cut = [at for at in (completion.find(stop, position, end) for stop in stops) if at >= 0]
        if found < 0 and not cut:
            return values, False
        end = min([end, *cut])
        values[index] = completion[position:end].strip()
        if found < 0:  # the gen ended at its stop; the fixed text after it is missing
            return values, False
        position = end
    return values, True


def fill_turn(executor: Any, terms: list[SpecTerm]) -> None:
    """Generate the whole assistant turn once (retrying a few times when it does not fit the
    template), then write its text and variables into ``executor``."""
    from sglrun.lang.backend import GenerateRequest
    from sglrun.lang.ir import SamplingParams

    frame = executor.frame
    gens = [term for term in terms if term.is_gen]
    if not gens:
        for term in terms:
            frame.text += term.text
        return
    first = gens[0].params or SamplingParams()
    params = SamplingParams().overridden_by(first)
    params.max_new_tokens = executor.num_api_spec_tokens
    params.stop = tuple(executor.chat_template.stop_str)
    request = GenerateRequest(
        prompt=frame.text,
        params=params,
        messages=frame.messages,
        role="assistant",
        role_text="",
        images=frame.images,
        name=gens[0].name,
    )
    meta: dict[str, Any] = {}
    values: dict[int, str] = {}
    complete = False
    completion = ""
    for _ in range(MAX_TRIES):
        result = executor.call_backend(executor.backend.generate, request)
        completion = result.text if isinstance(result.text, str) else result.text[0]
        meta = dict(result.meta_info, speculative=True)
        values, complete = match_prefix(terms, completion)
        if complete:
            break
    if not complete:  # as SGLang: partial values (later gens empty), not a program error
        warning = (
            f"speculative execution: after {MAX_TRIES} tries the model's assistant turn "
            f"({completion[:60]!r}) did not follow the program's template; "
            "the values that did not fit are empty"
        )
        logger.warning(warning)
        meta["warning"] = warning
    for index, term in enumerate(terms):
        if term.is_gen:
            frame.text += values[index]
            executor.sync.produce(term.name, values[index], dict(meta))
        else:
            frame.text += term.text


def speculative_gen(executor: Any, params: Any) -> tuple[str, dict[str, Any]]:
    """Completion-model speculation: one long generation serves the following gens; each
    takes its text up to its stop."""
    from sglrun.lang.ir import SamplingParams

    frame = executor.frame
    meta: dict[str, Any] = {}
    stops = [s for s in (params.stop or ()) if s]
    if not frame.speculated:
        spec = SamplingParams().overridden_by(params)
        spec.max_new_tokens = max(params.max_new_tokens or 0, executor.num_api_spec_tokens or 0)
        spec.stop = ()
        result = executor.call_backend(executor.backend.generate, executor._request(spec))
        frame.speculated = result.text if isinstance(result.text, str) else result.text[0]
        meta = dict(result.meta_info)
    positions = [frame.speculated.find(s) for s in stops]
    positions = [p for p in positions if p >= 0]
    cut = min(positions) if positions else len(frame.speculated)
    text = frame.speculated[:cut]
    frame.speculated = frame.speculated[cut:]
    return text, meta
