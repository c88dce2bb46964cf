"""``SglFunction``: what ``@sglrun.function`` returns; ``run``, ``run_batch``, ``bind``, ..."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sglrun.errors import InvalidArgumentError
from sglrun.lang.ir import SamplingParams
from sglrun.lang.sampling import check_sampling

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.state import ProgramState
    from sglrun.lang.tracing import TracerProgramState

__all__ = ["SglFunction", "check_sampling"]


class SglFunction:
    """A program: a Python function whose first parameter is the state ``s``."""

    def __init__(
        self,
        func: Callable[..., Any],
        num_api_spec_tokens: int | None = None,
        bind_arguments: dict[str, Any] | None = None,
    ) -> None:
        if not callable(func):
            raise InvalidArgumentError(f"@function needs a function, not {func!r}")
        if num_api_spec_tokens is not None and (
            not isinstance(num_api_spec_tokens, int) or num_api_spec_tokens < 1
        ):
            raise InvalidArgumentError("num_api_spec_tokens must be a positive int")
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise InvalidArgumentError(
                f"{func.__name__}: the first parameter must be the program state `s`"
            )
        self.arg_params = params[1:]
        self.arg_names = [p.name for p in self.arg_params]
        self.arg_defaults = [p.default for p in self.arg_params if p.default is not p.empty]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        # Keyword-only calls of a program without *args/**kwargs (every row of a batch) are
        # bound without inspect (measured under cProfile: 15 µs a row before, 3 µs after).
        self._plain = all(p.kind in named for p in self.arg_params)
        self._required = frozenset(p.name for p in self.arg_params if p.default is p.empty)
        self._names = frozenset(self.arg_names)
        self._state_name = params[0].name
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<sglrun function {self.__name__}({', '.join(self.arg_names)})>"

    @property
    def name(self) -> str:
        return self.__name__

    # ------------------------------------------------------------ arguments
    def bind(self, **kwargs: Any) -> SglFunction:
        self._check_names(kwargs)
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _check_names(self, kwargs: dict[str, Any]) -> None:
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in self.arg_params)
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown and not accepts_var_kw:
            raise InvalidArgumentError(
                f"{self.__name__}() got unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"its parameters are: {', '.join(self.arg_names) or '(none)'}"
            )

    def bind_call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check positional and keyword arguments against the signature; return kwargs."""
        merged = {**self.bind_arguments, **kwargs}
        if not args and self._plain and self._required <= merged.keys() <= self._names:
            return {name: merged[name] for name in self.arg_names if name in merged}
        try:
            bound = self.signature.bind(None, *args, **merged)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"{self.__name__}(): {exc}; its parameters are: "
                f"{', '.join(self.arg_names) or '(none)'}"
            ) from None
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self.signature.parameters)))
        return arguments

    def call(self, state: Any, arguments: dict[str, Any]) -> Any:
        """Run the function on ``state`` with ``arguments`` as ``bind_call`` gives them: by
        parameter name, a ``*args`` parameter's values as one tuple and a ``**kwargs``
        parameter's as one dict (each passed on as the function declares it)."""
        if self._plain:
            return self.func(state, **arguments)
        bound = inspect.BoundArguments(self.signature, {self._state_name: state, **arguments})
        return self.func(*bound.args, **bound.kwargs)

    # ------------------------------------------------------------ running
    def run(
        self,
        *args: Any,
        max_new_tokens: int = 128,
        n: int = 1,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        stream: bool = False,
        backend: Backend | None = None,
        use_thread: bool = True,
        cache: Any = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program once. ``cache``: a path, True (the user cache directory), False, or
        a ``CallCache``; None: ``sgl.set_cache``'s (a program with a parameter named
        ``cache`` gets the value as its argument instead)."""
        from sglrun.lang.runtime import run_program

        if "cache" in self.arg_names and cache is not None:
            kwargs["cache"], cache = cache, None

        sampling = dict(
            max_new_tokens=max_new_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
            stop_regex=stop_regex, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        check_sampling(f"{self.__name__}.run", sampling)
        arguments = self.bind_call(args, kwargs)
        defaults = SamplingParams.defaults(**sampling)
        state = run_program(self, backend, arguments, defaults, stream=stream, cache=cache)
        error = None if stream else state.executor.body_error
        if error is not None:  # as SGLang: the program's own exception leaves run()
            raise error
        return state

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any] | Sequence[Any]],
        *,
        max_new_tokens: int = 128,
        n: int = 1,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        backend: Backend | None = None,
        num_threads: str | int = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        cache: Any = None,
    ) -> list[ProgramState] | Iterator[ProgramState]:
        """Run the program once per row. ``cache`` as in ``run``."""
        from sglrun.lang.runtime import run_program_batch

        if not isinstance(batch_kwargs, (list, tuple)):
            raise InvalidArgumentError(
                f"{self.__name__}.run_batch: batch_kwargs must be a list of dicts or tuples"
            )
        if num_threads != "auto" and (
            not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1
        ):
            raise InvalidArgumentError(
                f"{self.__name__}.run_batch: num_threads must be 'auto' or an int >= 1, "
                f"not {num_threads!r}"
            )
        sampling = dict(
            max_new_tokens=max_new_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
            stop_regex=stop_regex, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        check_sampling(f"{self.__name__}.run_batch", sampling)
        rows = []
        for position, item in enumerate(batch_kwargs):
            try:
                if isinstance(item, dict):
                    rows.append(self.bind_call((), item))
                elif isinstance(item, (list, tuple)):
                    rows.append(self.bind_call(tuple(item), {}))
                else:
                    raise InvalidArgumentError(f"expected a dict or tuple, not {type(item)}")
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"run_batch row {position}: {exc}") from None
        defaults = SamplingParams.defaults(**sampling)
        return run_program_batch(
            self,
            backend,
            rows,
            defaults,
            num_threads=num_threads,
            progress_bar=progress_bar,
            generator_style=generator_style,
            cache=cache,
        )

    # ------------------------------------------------------------ tracing
    def trace(self, *, backend: Backend | None = None, **kwargs: Any) -> TracerProgramState:
        """Run the program without a model: every gen yields a placeholder, every select its
        first choice, and a missing argument its ``{name}`` (an f-string of one raises
        ``TypeError``, as in SGLang). The state lists the nodes appended (``last_node``)."""
        from sglrun.lang.tracing import trace

        self._check_names(kwargs)
        return trace(self, self.by_parameter({**self.bind_arguments, **kwargs}))

    def by_parameter(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments as ``bind_call`` gives them, missing ones left out: the keys no
        other parameter takes go into the ``**kwargs`` parameter's dict."""
        catch_all = next((p.name for p in self.arg_params if p.kind is p.VAR_KEYWORD), None)
        if catch_all is None:
            return kwargs
        named = {p.name for p in self.arg_params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        arguments = {name: value for name, value in kwargs.items() if name in named}
        arguments[catch_all] = {k: v for k, v in kwargs.items() if k not in named}
        return arguments

    def cache(self, backend: Backend | None = None) -> str:
        """Send the prompt prefix every run shares to the backend's cache; returns it."""
        from sglrun.lang.global_config import global_config
        from sglrun.lang.tracing import shared_prefix

        prefix = shared_prefix(self)
        if prefix:
            global_config.resolve_backend(backend).cache_prefix(prefix)
        return prefix
