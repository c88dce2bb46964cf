"""sglrun: run SGLang frontend programs on an embedded llama.cpp engine or any server.

``import sglrun as sgl`` gives the names of ``sglang.lang``'s public API. Backends are loaded
lazily, so importing sglrun is cheap and never starts an engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglrun.errors import SglrunError
from sglrun.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from sglrun.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglrun.lang.global_config import global_config
from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
from sglrun.lang.state import ProgramState, ProgramStateGroup

if TYPE_CHECKING:
    from sglrun.backends.anthropic import Anthropic
    from sglrun.backends.fake import FakeBackend
    from sglrun.backends.llamacpp import LlamaCpp
    from sglrun.backends.openai import OpenAI
    from sglrun.backends.runtime_endpoint import RuntimeEndpoint

__version__ = "0.1.0"

__all__ = [
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "Anthropic",
    "FakeBackend",
    "LlamaCpp",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "RuntimeEndpoint",
    "SglrunError",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "image",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
    "video",
]

def _batch_progress(total: int, description: str) -> Any:
    """``run_batch(progress_bar=True)`` draws with the CLI's display (Rich, loaded on use)."""
    from sglrun.cli.display import batch_progress

    return batch_progress(total, description)


global_config.batch_progress = _batch_progress

_LAZY = {
    "Anthropic": "sglrun.backends.anthropic",
    "FakeBackend": "sglrun.backends.fake",
    "LlamaCpp": "sglrun.backends.llamacpp",
    "OpenAI": "sglrun.backends.openai",
    "RuntimeEndpoint": "sglrun.backends.runtime_endpoint",
}


def __getattr__(name: str) -> Any:
    """Backends import on first use, keeping ``import sglrun`` fast."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sglrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
