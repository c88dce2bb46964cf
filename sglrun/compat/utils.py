"""``sglang.utils``: the two helpers SGLang's benchmarks use around programs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["dump_state_text", "read_jsonl"]


def read_jsonl(filename: str) -> Iterator[Any]:
    """Each line of a JSONL file, parsed (blank lines skipped)."""
    with open(filename, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def dump_state_text(filename: str, states: Iterable[Any], mode: str = "w") -> None:
    """Write each state's text (or the string given) between rules, as SGLang's does."""
    with open(filename, mode, encoding="utf-8") as handle:
        for index, state in enumerate(states):
            if isinstance(state, str):
                text = state
            else:
                text = state.text() if hasattr(state, "text") else str(state)
            handle.write(f"{'=' * 40} {index} {'=' * 40}\n{text}\n{'=' * 80}\n\n")
