"""The interpreter: the language's rules, one per IR node, applied to one program state.

``Executor`` keeps a state's data in a ``Frame`` and its waiting in a ``StateSync``; what it
adds is the rules (``RULES``: an explicit table from IR class to method, next to the IR, so
"find usages" of a node reaches its rule). Every program runs as a task of a hub
(``sglrun.lang.hub``): the root state executes each expression at once in the program's own
task; a forked state queues its expressions and drains them as a task of the same hub, so
forks generate concurrently, and a fork never outlives its program (``end`` waits for them; a
failure or a cancellation cancels them). A failure is recorded, later expressions are
skipped, and readers of missing variables get an error that names the variable and the cause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import greenlet

from sglrun.errors import (
    InvalidArgumentError,
    ProgramError,
    UnsupportedCapabilityError,
    UnsupportedNodeError,
)
from sglrun.lang.backend import Backend, GenerateRequest, GenerateResult, SelectRequest
from sglrun.lang.chat_template import ChatTemplate
from sglrun.lang.frame import Frame
from sglrun.lang.hub import run_blocking
from sglrun.lang.ir import (
    SamplingParams,
    SglArgument,
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    SglVideo,
    resolve_sampling,
)
from sglrun.lang.sync import StateSync

if TYPE_CHECKING:
    from sglrun.lang.call_cache import CallCache
from sglrun.lang.values import check_json, cut_note, load_image, parse_dtype, split_reasoning

__all__ = ["RULES", "Executor"]


def _declared_names(expr: SglExpr) -> list[str]:
    """Variables an expression will produce, so readers know to wait for them."""
    if isinstance(expr, (SglGen, SglSelect, SglVarScopeEnd, SglSeparateReasoning)):
        return [expr.name] if expr.name else []
    if isinstance(expr, SglExprList):
        return [name for item in expr.expr_list for name in _declared_names(item)]
    return []


class Executor:
    """Executes expressions into one program state (``frame``), by the language's rules."""

    def __init__(
        self,
        backend: Backend,
        arguments: dict[str, Any],
        defaults: SamplingParams,
        chat_template: ChatTemplate,
        *,
        stream: bool = False,
        readers_wait: bool | None = None,
        concurrent: bool = False,
        num_api_spec_tokens: int | None = None,
        frame: Frame | None = None,
        cache: CallCache | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache  # the run's call cache (``lang/call_cache.py``), or None
        self.arguments = arguments
        self.defaults = defaults
        self.chat_template = chat_template
        self.stream = stream  # gens stream their text into the state as it comes
        self.concurrent = concurrent  # a fork: expressions are queued and drained
        self.num_api_spec_tokens = num_api_spec_tokens
        self.frame = frame if frame is not None else Frame()
        waits = stream if readers_wait is None else readers_wait
        self.sync = StateSync(self.frame, readers_wait=waits)
        self.forks: list[Executor] = []  # children: never outlive this state's program
        self.body_error: Exception | None = None  # the program's own exception, if it raised
        self.traced: list[SglExpr] | None = None  # the nodes appended, when tracing

    # ----------------------------------------------------------------- submission
    def submit(self, expr: SglExpr | str) -> None:
        if isinstance(expr, str):
            expr = SglConstantText(expr)
        elif not isinstance(expr, SglExpr):
            raise InvalidArgumentError(
                f"cannot append {type(expr).__name__} to a program state; "
                "append a str or an sglrun primitive"
            )
        if self.traced is not None:  # trace(): the nodes, linked as SGLang's tracer links them
            expr.prev_node = self.traced[-1] if self.traced else None
            self.traced.append(expr)
        if self.sync.error is not None:
            return
        if self.concurrent:
            self.sync.enqueue(expr, _declared_names(expr), self._execute_guarded)
        else:
            self._execute_guarded(expr)

    def _execute_guarded(self, expr: SglExpr) -> None:
        try:
            self.execute(expr)
        except Exception as exc:  # recorded, surfaced by error() and by variable reads
            self.sync.fail(exc)
        finally:
            if self.stream or self.concurrent:
                with self.sync.cond:
                    self.sync.notify()

    def call_backend(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the backend (once it says it can do what the request needs); on a hub, one
        that would block the thread runs on a worker."""
        backend = self.backend
        for request in args[:1]:
            for capability in request.needs():
                if not backend.supports(capability):
                    hint = backend.capability_hint(capability)
                    where = f"needed by {request.name or 'a gen'!r}"
                    raise UnsupportedCapabilityError(
                        capability, backend.name, f"{hint} ({where})" if hint else where
                    )
        cache = self.cache
        if cache is not None and args:
            return cache.call(
                backend,
                args[0],
                lambda: self._send(method, args, kwargs),
                kwargs.get("on_chunk"),
            )
        return self._send(method, args, kwargs)

    def _send(self, method: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        if self.backend.cooperative and "on_chunk" not in kwargs:
            return method(*args, **kwargs)
        return run_blocking(method, *args, **kwargs)

    def wait_idle(self) -> None:
        """Wait until every queued expression has run (a fork)."""
        if self.concurrent:
            self.sync.idle()

    def end(self, *, wait: bool = True) -> None:
        """The program returned: wait for its forks (they never outlive it), then readers
        stop waiting for more text. ``wait=False`` after a cancellation or a kill."""
        if wait:
            self.wait_idle()
            for child in self.forks:
                child.end()
        self.sync.finish()

    def fail(self, exc: BaseException) -> None:
        self.sync.fail(exc)

    def cancel(self, error: BaseException) -> None:
        """Stop this state and every fork of it: queued expressions are dropped and a fork
        parked on the model raises ``Cancelled`` where it waits."""
        self.sync.fail(error)
        for child in self.forks:
            child.cancel(error)
        drainer = self.sync.drainer
        if drainer is not None and not drainer.done and drainer is not greenlet.getcurrent():
            drainer.hub.cancel(drainer, error)

    def fork(self, size: int) -> list[Executor]:
        if isinstance(size, bool) or not hasattr(size, "__index__") or int(size) < 1:
            raise InvalidArgumentError(f"fork size must be a positive int, not {size!r}")
        self.wait_idle()
        children = [
            Executor(
                self.backend,
                self.arguments,
                self.defaults,
                self.chat_template,
                concurrent=True,
                frame=self.frame.forked(),
                cache=self.cache,
            )  # fmt: skip
            for _ in range(int(size))
        ]
        self.forks.extend(children)
        return children

    # ----------------------------------------------------------------- dispatch
    def execute(self, expr: SglExpr) -> None:
        rule = RULES.get(type(expr))
        if rule is None:
            for kind, candidate in RULES.items():  # a subclass of a known node
                if isinstance(expr, kind):
                    rule = candidate
                    break
            else:
                raise UnsupportedNodeError(f"no interpreter rule for {type(expr).__name__}")
        rule(self, expr)

    def fill(self, value: str) -> None:
        frame = self.frame
        if frame.speculated:
            frame.speculated = (
                frame.speculated[len(value) :] if frame.speculated.startswith(value) else ""
            )
        frame.text += value

    def _request(self, params: SamplingParams, name: str | None = None) -> GenerateRequest:
        frame = self.frame
        return GenerateRequest(
            prompt=frame.text,
            params=params,
            messages=frame.messages,
            role=frame.role,
            role_text=frame.role_text,
            images=frame.images,
            name=name,
        )

    # ----------------------------------------------------------------- the rules
    def expr_list(self, expr: SglExprList) -> None:
        for item in expr.expr_list:
            self.execute(item)

    def constant_text(self, expr: SglConstantText) -> None:
        if self.frame.spec_terms is not None:
            from sglrun.lang.speculative import SpecTerm

            self.frame.spec_terms.append(SpecTerm(text=str(expr.value)))
            return
        self.fill(str(expr.value))

    def gen(self, expr: SglGen) -> None:
        params = resolve_sampling(self.defaults, expr.sampling_params, self.chat_template.stop_str)
        name = expr.name
        if self.frame.spec_terms is not None:
            from sglrun.lang.speculative import SpecTerm

            self.frame.spec_terms.append(SpecTerm(name=name, params=params, is_gen=True))
            return
        if self.num_api_spec_tokens and not self.backend.is_chat_model and not self.stream:
            from sglrun.lang.speculative import speculative_gen

            text, meta = speculative_gen(self, params)
            self.frame.text += text
            self.sync.produce(name, text, meta)
            return
        started = time.perf_counter()
        streamed = self.stream and params.n in (None, 1)
        if streamed:
            result = self._streamed_gen(name, params)
        else:
            result = self.call_backend(self.backend.generate, self._request(params, name))
        meta = dict(result.meta_info)
        meta.setdefault("e2e_latency", time.perf_counter() - started)
        produced = result.text
        dry = bool(meta.get("dry_run"))
        if params.json_schema is not None:
            meta["constraint"] = "json_schema"  # the text is a JSON document (--json-values)
            if not dry:
                check_json(produced, name, meta)
        dtype = None if dry else params.dtype  # a placeholder stays as it is
        try:
            if isinstance(produced, list):
                self.fill(produced[0] if produced else "")
                value: Any = [parse_dtype(t, dtype, name) for t in produced]
            else:
                if not streamed:
                    self.fill(produced)
                value = parse_dtype(produced, dtype, name)
        except ProgramError as exc:
            raise ProgramError(f"{exc}{cut_note(meta)}") from None
        self.sync.produce(name, value, meta)

    def _streamed_gen(self, name: str | None, params: SamplingParams) -> GenerateResult:
        sync = self.sync
        sync.begin_stream(name)
        got = [""]

        def on_chunk(piece: str, meta: dict[str, Any] | None = None) -> None:
            got[0] += piece
            sync.stream_piece(name, piece, meta)

        result: GenerateResult = self.call_backend(
            self.backend.generate, self._request(params, name), on_chunk=on_chunk
        )
        # Backends report the final text too; trust it if streaming delivered less.
        final = result.text if isinstance(result.text, str) else ""
        if final != got[0] and final.startswith(got[0]):
            on_chunk(final[len(got[0]) :])
        return result

    def select(self, expr: SglSelect) -> None:
        if not expr.choices:
            raise InvalidArgumentError(f"select {expr.name!r} needs at least one choice")
        if self.frame.spec_terms is not None:
            raise ProgramError(
                f"select {expr.name!r} cannot run inside a speculative assistant turn "
                "(num_api_spec_tokens): put it in its own turn"
            )
        frame = self.frame
        request = SelectRequest(
            prompt=frame.text,
            choices=list(expr.choices),
            temperature=expr.temperature,
            choices_method=expr.choices_method,
            messages=frame.messages,
            role=frame.role,
            role_text=frame.role_text,
            images=frame.images,
            name=expr.name,
        )
        decision = self.call_backend(self.backend.select, request)
        self.fill(decision.decision)
        self.sync.produce(expr.name, decision.decision, decision.meta_info)

    def argument(self, expr: SglArgument) -> None:
        """A traced program's missing argument: its placeholder, as a dry run shows it."""
        self.fill("{" + expr.name + "}" if expr.value is None else str(expr.value))

    def variable(self, expr: SglVariable) -> None:
        source = expr.source
        executor = getattr(source, "executor", source)
        self.fill(str(executor.sync.get(expr.name)))

    def var_scope_begin(self, expr: SglVarScopeBegin) -> None:
        self.frame.scope_starts[expr.name] = len(self.frame.text)

    def var_scope_end(self, expr: SglVarScopeEnd) -> None:
        starts = self.frame.scope_starts
        if expr.name not in starts:
            raise ProgramError(f"var_scope {expr.name!r} ended but never began")
        self.sync.produce(expr.name, self.frame.text[starts.pop(expr.name) :])

    def commit_lazy(self, expr: SglCommitLazy) -> None:
        """Nothing is lazy here: every expression is already sent when executed."""

    def concate_and_append(self, expr: SglConcateAndAppend) -> None:
        pieces = []
        for state in expr.states:
            child: Executor = state.executor
            child.wait_idle()
            if child.sync.error is not None:
                raise child.sync.error
            pieces.append(child.frame.text[child.frame.fork_start :])
        self.fill("".join(pieces))

    def separate_reasoning(self, expr: SglSeparateReasoning) -> None:
        target = expr.expr
        if isinstance(target, SglExprList):
            for item in target.expr_list:
                self.separate_reasoning(SglSeparateReasoning(expr.model_type, item))
            return
        name = getattr(target, "name", None)
        if not isinstance(target, (SglGen, SglSelect)) or name is None:
            return
        full = str(self.frame.variables.get(name, ""))
        reasoning, answer = split_reasoning(full, expr.model_type)
        self.sync.produce(name, answer)
        self.sync.produce(f"{name}_reasoning_content", reasoning)
        text = self.frame.text
        if text.endswith(full):
            self.frame.text = text[: len(text) - len(full)] + answer


# ----------------------------------------------------------------- rules of turns and media


def role_begin(self: Executor, expr: SglRoleBegin) -> None:
    """A role opens: the template's prefix (and its default system turn, first)."""
    frame = self.frame
    if frame.role is not None:
        raise ProgramError(
            f"cannot begin role {expr.role!r} inside role {frame.role!r}: "
            "roles cannot nest; end the current one first"
        )
    if not frame.messages and expr.role != "system":
        default_system = self.chat_template.default_system_prompt
        if default_system:
            role_begin(self, SglRoleBegin("system"))
            self.fill(default_system)
            role_end(self, SglRoleEnd("system"))
    frame.role = expr.role
    prefix, _ = self.chat_template.get_prefix_and_suffix(expr.role, frame.messages)
    frame.text += prefix
    frame.role_begin = len(frame.text)
    if expr.role == "assistant" and self.num_api_spec_tokens and self.backend.is_chat_model:
        frame.spec_terms = []  # collect the turn; the model writes it whole at role end


def role_end(self: Executor, expr: SglRoleEnd) -> None:
    """A role closes: the template's suffix; the turn joins the chat messages."""
    frame = self.frame
    if frame.role != expr.role:
        raise ProgramError(f"cannot end role {expr.role!r}: the open role is {frame.role!r}")
    if frame.spec_terms is not None:
        from sglrun.lang.speculative import fill_turn

        terms, frame.spec_terms = frame.spec_terms, None
        fill_turn(self, terms)
    content = frame.text[frame.role_begin :].lstrip()
    _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, frame.messages)
    frame.role = None
    frame.text += suffix
    if frame.turn_images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
        parts += [
            {"type": "image_url", "image_url": {"url": image.data_url}}
            for image in frame.turn_images
        ]
        frame.messages.append({"role": expr.role, "content": parts})
        frame.turn_images = []
    else:
        frame.messages.append({"role": expr.role, "content": content})


def image(self: Executor, expr: SglImage) -> None:
    image = load_image(expr.path)
    self.frame.images.append(image)
    self.frame.turn_images.append(image)
    self.frame.text += self.chat_template.image_token


def video(self: Executor, expr: SglVideo) -> None:
    raise UnsupportedCapabilityError(
        "video", self.backend.name, "sglrun ships no video decoder; pass frames as images"
    )


# The language's rules: one per node of the IR (``sglrun.lang.ir``).
RULES: dict[type, Callable[[Executor, Any], None]] = {
    SglExprList: Executor.expr_list,
    SglConstantText: Executor.constant_text,
    SglGen: Executor.gen,
    SglSelect: Executor.select,
    SglRoleBegin: role_begin,
    SglRoleEnd: role_end,
    SglImage: image,
    SglVideo: video,
    SglVariable: Executor.variable,
    SglArgument: Executor.argument,
    SglVarScopeBegin: Executor.var_scope_begin,
    SglVarScopeEnd: Executor.var_scope_end,
    SglCommitLazy: Executor.commit_lazy,
    SglConcateAndAppend: Executor.concate_and_append,
    SglSeparateReasoning: Executor.separate_reasoning,
}


_SGLANG_NAMES = {
    "ProgramState": ("sglrun.lang.state", "ProgramState"),
    "ProgramStateGroup": ("sglrun.lang.state", "ProgramStateGroup"),
    "StreamExecutor": ("sglrun.lang.executor_view", "StreamExecutorView"),
}


def __getattr__(name: str) -> Any:
    """The names SGLang programs import from ``sglang.lang.interpreter`` (their modules
    import this one, so they are found on first use)."""
    found = _SGLANG_NAMES.get(name)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(found[0]), found[1])
