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
from typing import TYPE_CHECKING, Any

from sglrun.errors import ProgramError

if TYPE_CHECKING:
    from sglrun.lang.ir import SamplingParams

__all__ = ["SpecTerm", "match_template"]

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
    values: dict[int, str] = {}
    position = 0
    for index, term in enumerate(terms):
        if not term.is_gen:
            fixed = term.text.strip()
            if not fixed:
                continue
            found = completion.find(fixed, position)
            if found < 0 or completion[position:found].strip():
                return None
            position = found + len(fixed)
            continue
        end = len(completion)
        following = next((t.text.strip() for t in terms[index + 1 :] if not t.is_gen), "")
        if following:
            found = completion.find(following, position)
            if found < 0:
                return None
            end = found
        stops = [s for s in (term.params.stop if term.params else ()) or () if s]
        for stop in stops:
            at = completion.find(stop, position, end)
            if at >= 0:
                end = min(end, at)
        values[index] = completion[position:end].strip()
        position = end
    return values


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
    values = None
    completion = ""
    for _ in range(MAX_TRIES):
        result = executor.call_backend(executor.backend.generate, request)
        completion = result.text if isinstance(result.text, str) else result.text[0]
        meta = dict(result.meta_info)
        values = match_template(terms, completion)
        if values is not None:
            break
    if values is None:
        raise ProgramError(
            f"speculative execution: after {MAX_TRIES} tries the model's assistant turn "
            f"({completion[:60]!r}) did not follow the program's template"
        )
    for index, term in enumerate(terms):
        if term.is_gen:
            frame.text += values[index]
            executor.sync.produce(term.name, values[index], dict(meta, speculative=True))
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
