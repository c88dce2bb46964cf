"""The primitives a program appends: ``gen``, ``select``, roles, ``image``, ...

Same names, parameters and defaults as ``sglang.lang.api``; arguments are checked here, at the
call, so a typo fails on the line that made it rather than inside a worker thread.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sglrun.errors import InvalidArgumentError
from sglrun.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sglrun.lang.function import SglFunction, check_sampling
from sglrun.lang.global_config import adapt_backend, global_config
from sglrun.lang.ir import (
    SamplingParams,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    SglVideo,
    normalize_sampling,
)
from sglrun.lang.sampling import SAMPLING_RULES, sampling_problem

if TYPE_CHECKING:
    from sglrun.lang.call_cache import CallCache

__all__ = [
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
]


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """Decorate a program: ``@function`` or ``@function(num_api_spec_tokens=N)``."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)

    def decorator(inner: Callable[..., Any]) -> SglFunction:
        return SglFunction(inner, num_api_spec_tokens=num_api_spec_tokens)

    return decorator


def set_default_backend(backend: Any) -> None:
    from sglrun.lang.backend import Backend

    if backend is None:  # as SGLang: no default; the next run starts the registered one
        global_config.default_backend = None
        return
    backend = adapt_backend(getattr(backend, "endpoint", backend))
    if not isinstance(backend, Backend):
        raise InvalidArgumentError(f"set_default_backend needs a backend, not {backend!r}")
    global_config.default_backend = backend


def set_cache(
    path: Any = True, *, mode: str = "use", max_size: int | str | None = None
) -> CallCache | None:
    """Cache every model call of every run from now on (sglrun's own; SGLang has none):
    ``path`` is the SQLite file (a directory gets ``calls.sqlite`` in it; True: the user cache
    directory, ``~/.cache/sglrun``), or a ``CallCache``; None or False turns it off. ``mode``:
    ``use`` replays what is cached, ``refresh`` sends every call again and stores the new
    answers, ``off`` turns it off. A run's ``cache=`` argument wins. Returns the cache."""
    from sglrun.lang.call_cache import CACHE_MODES, CallCache

    if mode not in CACHE_MODES:
        raise InvalidArgumentError(f"set_cache: mode must be one of {CACHE_MODES}, not {mode!r}")
    if path is None or path is False or mode == "off":
        global_config.call_cache = None
        return None
    if isinstance(path, CallCache):
        cache = path
    elif path is True or isinstance(path, (str, os.PathLike)):
        cache = CallCache.open(None if path is True else path, mode=mode, max_size=max_size)
    else:
        raise InvalidArgumentError(f"set_cache needs a path, True or a CallCache, not {path!r}")
    global_config.call_cache = cache
    return cache


def flush_cache(backend: Any = None, empty_cache: bool = True) -> bool:
    backend = getattr(backend, "endpoint", backend) or global_config.default_backend
    return False if backend is None else bool(backend.flush_cache(empty_cache=empty_cache))


def get_server_info(backend: Any = None) -> dict[str, Any] | None:
    backend = getattr(backend, "endpoint", backend) or global_config.default_backend
    return None if backend is None else backend.get_server_info()


def _check_name(where: str, name: Any) -> None:
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"{where}: name must be a str, not {name!r}")


def _schema_text(where: str, schema: Any) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):  # written out as a dict would be: one request, one cache key
        try:
            return json.dumps(json.loads(schema))
        except ValueError as exc:
            raise InvalidArgumentError(f"{where}: json_schema is not valid JSON: {exc}") from None
    if isinstance(schema, dict):
        return json.dumps(schema)
    model_schema = getattr(schema, "model_json_schema", None)  # a pydantic model class
    if callable(model_schema):
        return json.dumps(model_schema())
    raise InvalidArgumentError(f"{where}: json_schema must be a JSON str or dict, not {schema!r}")


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | None = None,
) -> SglExpr:
    """Generate text into variable ``name`` (a ``select`` when ``choices`` is given)."""
    _check_name("gen", name)
    if choices:
        return select(
            name,
            choices,
            0.0 if temperature is None else temperature,
            token_length_normalized if choices_method is None else choices_method,
        )
    options = (max_tokens, min_tokens, n, stop, stop_token_ids, stop_regex, temperature, top_p,
               top_k, min_p, frequency_penalty, presence_penalty, ignore_eos, return_logprob,
               logprob_start_len, top_logprobs_num, return_text_in_logprobs, dtype, regex,
               json_schema)  # fmt: skip
    kinds = tuple(map(type, options))
    key = (options, kinds) if list not in kinds and tuple not in kinds else _options_key(options)
    try:
        params, keep = _GEN_PARAMS.get(key), True
    except TypeError:  # an unhashable option (a dict schema): checked and built every time
        params, keep = None, False
    if params is None:
        params = _gen_params(name, *options)
        if keep:
            if len(_GEN_PARAMS) >= GEN_MEMO_LIMIT:
                _GEN_PARAMS.clear()
            _GEN_PARAMS[key] = params
    return SglGen(name, params)


# A program's gen() calls run once per row with the same options: their checked and
# normalized sampling parameters are kept, by option values and their types (1 == True, and
# only one of them is a valid temperature), instead of rebuilt (measured under cProfile:
# 20 µs a gen() before, 4 µs after).
# SamplingParams are shared between the SglGen nodes; nothing changes one in place.
GEN_MEMO_LIMIT = 4096
_GEN_PARAMS: dict[tuple[Any, ...], SamplingParams] = {}


def _options_key(options: tuple[Any, ...]) -> tuple[Any, ...]:
    """The memo key of options with lists in them: every item with its type."""
    key: list[Any] = []
    for value in options:
        kind = type(value)
        if value is None or kind is str:
            key.append(value)
        elif kind is list or kind is tuple:
            key.append((list, tuple((type(item), item) for item in value)))
        else:
            key.append((kind, value))
    return tuple(key)


def _gen_params(
    name: str | None,
    max_tokens: int | None,
    min_tokens: int | None,
    n: int | None,
    stop: str | list[str] | None,
    stop_token_ids: list[int] | None,
    stop_regex: str | list[str] | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    frequency_penalty: float | None,
    presence_penalty: float | None,
    ignore_eos: bool | None,
    return_logprob: bool | None,
    logprob_start_len: int | None,
    top_logprobs_num: int | None,
    return_text_in_logprobs: bool | None,
    dtype: type | str | None,
    regex: str | None,
    json_schema: Any,
) -> SamplingParams:
    """Check ``gen``'s options (failing with one line naming ``name``) and normalize them."""
    values: dict[str, Any] = dict(
        max_tokens=max_tokens, min_tokens=min_tokens, n=n, stop=stop,
        stop_token_ids=stop_token_ids, stop_regex=stop_regex, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs,
    )  # fmt: skip
    check_sampling(f"gen({name!r})", values)
    for pattern in ([regex] if regex else []) + (
        [stop_regex] if isinstance(stop_regex, str) else list(stop_regex or [])
    ):
        if not isinstance(pattern, str):
            raise InvalidArgumentError(f"gen({name!r}): a regex must be a str, not {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(f"gen({name!r}): invalid regex {pattern!r}: {exc}") from None
    if regex is not None and json_schema is not None:
        raise InvalidArgumentError(f"gen({name!r}): give regex or json_schema, not both")
    values.update(dtype=dtype, regex=regex, json_schema=_schema_text(f"gen({name!r})", json_schema))
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return SamplingParams(**normalize_sampling(values))
    except InvalidArgumentError as exc:  # a dtype that is no type a gen can parse
        raise InvalidArgumentError(f"gen({name!r}): {exc}") from None


def _typed_gen(dtype: type, name: str | None, options: dict[str, Any]) -> SglExpr:
    return gen(name, dtype=dtype, **options)


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> SglExpr:
    """Generate an integer (constrained decoding); the variable holds an ``int``."""
    options = {k: v for k, v in locals().items() if k != "name"}
    return _typed_gen(int, name, options)


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
) -> SglExpr:
    """Generate a double-quoted string; the variable holds the text inside the quotes."""
    options = {k: v for k, v in locals().items() if k != "name"}
    return _typed_gen(str, name, options)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> SglExpr:
    """Choose one of ``choices`` by the model's log-probabilities."""
    _check_name("select", name)
    if not choices or not isinstance(choices, (list, tuple)):
        raise InvalidArgumentError(f"select({name!r}): choices must be a non-empty list of str")
    if not all(isinstance(choice, str) for choice in choices):
        raise InvalidArgumentError(f"select({name!r}): every choice must be a str")
    if not isinstance(choices_method, ChoicesSamplingMethod):
        raise InvalidArgumentError(
            f"select({name!r}): choices_method must be one of token_length_normalized, "
            "greedy_token_selection, unconditional_likelihood_normalized"
        )
    problem = sampling_problem("temperature", temperature)
    if temperature is None or problem is not None:
        rule = SAMPLING_RULES["temperature"][2]
        raise InvalidArgumentError(f"select({name!r}): temperature must be {rule}")
    return SglSelect(name, list(choices), float(temperature), choices_method)


def image(expr: Any) -> SglImage:
    return SglImage(expr)


def video(path: str, num_frames: int) -> SglVideo:
    return SglVideo(path, num_frames)


def _role(name: str, expr: SglExpr | str | None) -> SglExprList:
    if expr is None:
        return SglExprList([SglRoleBegin(name), SglRoleEnd(name)])
    body = SglConstantText(expr) if isinstance(expr, str) else expr
    return SglExprList([SglRoleBegin(name), body, SglRoleEnd(name)])


def system(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("system", expr)


def user(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("user", expr)


def assistant(expr: SglExpr | str | None = None) -> SglExprList:
    return _role("assistant", expr)


def system_begin() -> SglRoleBegin:
    return SglRoleBegin("system")


def system_end() -> SglRoleEnd:
    return SglRoleEnd("system")


def user_begin() -> SglRoleBegin:
    return SglRoleBegin("user")


def user_end() -> SglRoleEnd:
    return SglRoleEnd("user")


def assistant_begin() -> SglRoleBegin:
    return SglRoleBegin("assistant")


def assistant_end() -> SglRoleEnd:
    return SglRoleEnd("assistant")


def separate_reasoning(expr: SglExpr | None = None, model_type: str | None = None) -> SglExprList:
    """Run ``expr``, then split its ``<think>`` reasoning into ``<name>_reasoning_content``."""
    items: list[SglExpr] = [expr] if expr is not None else []
    return SglExprList(items + [SglSeparateReasoning(model_type, expr)])
