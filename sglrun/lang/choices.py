"""How ``select`` turns per-choice log-probabilities into a decision.

Each method gets, per choice, the log-probabilities of the choice's tokens given the prompt
(``input_token_logprobs``: lists of ``(logprob, token_id, text)``) and their mean
(``normalized_prompt_logprobs``), and returns a ``ChoicesDecision``. The three methods and
their meta-info keys follow SGLang's.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any

__all__ = [
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "GreedyTokenSelection",
    "TokenLengthNormalized",
    "UnconditionalLikelihoodNormalized",
    "greedy_token_selection",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
]

TokenLogprobs = list[list[Any]]


@dataclasses.dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


def _first_argmax(values: list[float]) -> int:
    if not values:
        raise ValueError("select needs at least one choice")
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _logprob_values(tokens: list[Any]) -> list[float]:
    return [float(token[0]) if token[0] is not None else 0.0 for token in tokens]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: TokenLogprobs,
        output_token_logprobs: TokenLogprobs,
        unconditional_token_logprobs: TokenLogprobs | None = None,
    ) -> ChoicesDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice whose tokens have the highest mean log-probability."""

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: TokenLogprobs,
        output_token_logprobs: TokenLogprobs,
        unconditional_token_logprobs: TokenLogprobs | None = None,
    ) -> ChoicesDecision:
        best = _first_argmax(normalized_prompt_logprobs)
        return ChoicesDecision(
            choices[best],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
            },
        )


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare choices token by token, keeping those with the best log-probability at each
    position; a shorter choice is padded with its own mean so prefixes compete fairly."""

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: TokenLogprobs,
        output_token_logprobs: TokenLogprobs,
        unconditional_token_logprobs: TokenLogprobs | None = None,
    ) -> ChoicesDecision:
        width = max((len(tokens) for tokens in input_token_logprobs), default=0)
        matrix: list[list[float]] = []
        for tokens in input_token_logprobs:
            values = _logprob_values(tokens)
            pad = _mean(values) if values else float("nan")
            matrix.append(values + [pad] * (width - len(values)))
        remaining = list(range(len(choices)))
        for column in range(width):
            best = max(matrix[i][column] for i in remaining)
            remaining = [i for i in remaining if matrix[i][column] == best] or remaining
            if len(remaining) == 1:
                break
        return ChoicesDecision(
            choices[remaining[0]],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "greedy_logprob_matrix": matrix,
            },
        )


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice that the prompt makes most likely relative to its likelihood without the
    prompt: mean of (conditional - unconditional) token log-probabilities."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: TokenLogprobs,
        output_token_logprobs: TokenLogprobs,
        unconditional_token_logprobs: TokenLogprobs | None = None,
    ) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional logprobs")
        scores: list[float] = []
        for conditional, unconditional in zip(input_token_logprobs, unconditional_token_logprobs):
            cond = _logprob_values(conditional)
            uncond = _logprob_values(unconditional)
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional logprobs differ in length")
            scores.append(_mean([c - u for c, u in zip(cond, uncond)]))
        best = _first_argmax(scores)
        return ChoicesDecision(
            choices[best],
            {
                "normalized_prompt_logprobs": normalized_prompt_logprobs,
                "input_token_logprobs": input_token_logprobs,
                "output_token_logprobs": output_token_logprobs,
                "unconditional_token_logprobs": unconditional_token_logprobs,
                "normalized_unconditional_prompt_logprobs": scores,
            },
        )


def decide(
    method: ChoicesSamplingMethod,
    choices: list[str],
    input_token_logprobs: TokenLogprobs,
    unconditional_token_logprobs: TokenLogprobs | None = None,
    output_token_logprobs: TokenLogprobs | None = None,
) -> ChoicesDecision:
    """Apply ``method`` to per-choice token log-probabilities (what backends measure)."""
    normalized = [_mean(_logprob_values(tokens)) for tokens in input_token_logprobs]
    normalized = [v if not math.isnan(v) else float("-inf") for v in normalized]
    return method(
        choices=choices,
        normalized_prompt_logprobs=normalized,
        input_token_logprobs=input_token_logprobs,
        output_token_logprobs=output_token_logprobs or [[] for _ in choices],
        unconditional_token_logprobs=unconditional_token_logprobs,
    )


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
