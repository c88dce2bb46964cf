"""sglrun: run SGLang frontend programs on an embedded llama.cpp engine or any server.

``import sglrun as sgl`` gives the names of ``sglang.lang``'s public API. They are loaded on
first use, so importing sglrun is cheap and never starts an engine. This module also wires the
layers together: it registers the backends by name and the CLI's progress bar for
``run_batch(progress_bar=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglrun.lang.global_config import global_config
from sglrun.lang.registry import BackendOptions, register_backend

if TYPE_CHECKING:
    from sglrun.backends.anthropic import Anthropic
    from sglrun.backends.fake import FakeBackend
    from sglrun.backends.llamacpp import LlamaCpp
    from sglrun.backends.openai import OpenAI
    from sglrun.backends.runtime_endpoint import RuntimeEndpoint
    from sglrun.backends.sglang_runtime import Engine, Runtime
    from sglrun.compat import install_sglang_alias
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
        set_cache,
        set_default_backend,
        system,
        system_begin,
        system_end,
        user,
        user_begin,
        user_end,
        video,
    )
    from sglrun.lang.call_cache import CallCache
    from sglrun.lang.choices import (
        greedy_token_selection,
        token_length_normalized,
        unconditional_likelihood_normalized,
    )
    from sglrun.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR
    from sglrun.lang.state import ProgramState, ProgramStateGroup

__version__ = "0.1.0"

__all__ = [
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "Anthropic",
    "CallCache",
    "Engine",
    "FakeBackend",
    "LlamaCpp",
    "OpenAI",
    "ProgramState",
    "ProgramStateGroup",
    "Runtime",
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
    "install_sglang_alias",
    "select",
    "separate_reasoning",
    "set_cache",
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


def _backend(module: str, cls: str) -> Any:
    """A registry factory that imports its backend only when one is built."""

    def build(options: BackendOptions) -> Any:
        import importlib

        return getattr(importlib.import_module(f"sglrun.backends.{module}"), cls).from_options(
            options
        )

    return build


def _local_template(options: BackendOptions) -> Any:
    """The embedded engine's chat template, from its model file's name (no engine started)."""
    from sglrun.backends.model_path import resolve_model_path
    from sglrun.lang.chat_template import get_chat_template_by_model_path

    return get_chat_template_by_model_path(str(resolve_model_path(options.model)))


register_backend(
    "local", _backend("llamacpp", "LlamaCpp"), default=True, chat_template=_local_template,
    description="embedded llama.cpp (xllamacpp), the default; --model FILE.gguf",
)  # fmt: skip
register_backend(
    "sglang", _backend("runtime_endpoint", "RuntimeEndpoint"),
    description="an SGLang server's native API; --url (repeatable)",
)  # fmt: skip
register_backend(
    "openai", _backend("openai", "OpenAI"), needs_model=True,
    description="an OpenAI-compatible server (OpenAI, vLLM, llama.cpp); --model, --url",
)  # fmt: skip
register_backend(
    "anthropic", _backend("anthropic", "Anthropic"), needs_model=True,
    description="Anthropic's Messages API; --model",
)  # fmt: skip
register_backend("fake", _backend("fake", "FakeBackend"), hidden=True, description="tests")


def _batch_progress(total: int, description: str) -> Any:
    """``run_batch(progress_bar=True)`` draws with the CLI's display (Rich, loaded on use)."""
    from sglrun.cli.display import batch_progress

    return batch_progress(total, description)


global_config.batch_progress = _batch_progress

_LAZY = {
    **{
        name: "sglrun.lang.api"
        for name in (
            "assistant",
            "assistant_begin",
            "assistant_end",
            "flush_cache",
            "function",
            "gen",
            "gen_int",
            "gen_string",
            "get_server_info",
            "image",
            "select",
            "separate_reasoning",
            "set_cache",
            "set_default_backend",
            "system",
            "system_begin",
            "system_end",
            "user",
            "user_begin",
            "user_end",
            "video",
        )
    },
    **{
        name: "sglrun.lang.choices"
        for name in (
            "greedy_token_selection",
            "token_length_normalized",
            "unconditional_likelihood_normalized",
        )
    },
    **{name: "sglrun.lang.ir" for name in ("REGEX_BOOL", "REGEX_FLOAT", "REGEX_INT", "REGEX_STR")},
    "ProgramState": "sglrun.lang.state",
    "ProgramStateGroup": "sglrun.lang.state",
    "SglrunError": "sglrun.errors",
    "CallCache": "sglrun.lang.call_cache",
    "Anthropic": "sglrun.backends.anthropic",
    "FakeBackend": "sglrun.backends.fake",
    "LlamaCpp": "sglrun.backends.llamacpp",
    "OpenAI": "sglrun.backends.openai",
    "RuntimeEndpoint": "sglrun.backends.runtime_endpoint",
    "Runtime": "sglrun.backends.sglang_runtime",
    "Engine": "sglrun.backends.sglang_runtime",
    "install_sglang_alias": "sglrun.compat",
}


def __getattr__(name: str) -> Any:
    """Every public name imports on first use: ``import sglrun`` (and ``sglrun --help``)
    loads almost nothing."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sglrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
