"""The interpreter: executes expressions against one program state's text, roles and variables.

One ``visit_<kind>`` method per IR node kind. Every program runs as a task of a hub
(``sglrun.lang.hub``): the root state executes each expression at once in the program's own
task, and forked states queue their expressions and drain them as tasks of the same hub, so
forks generate concurrently and a fork never outlives its program (``end`` waits for them; a
failure or a cancellation cancels them). A failure is recorded, later expressions are skipped,
and readers of missing variables get an error that names the variable and the cause instead
of waiting forever.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import greenlet

from sglrun.errors import (
    InvalidArgumentError,
    ProgramError,
    UnsupportedCapabilityError,
    UnsupportedNodeError,
    VariableNotProducedError,
)
from sglrun.lang.backend import Backend, GenerateRequest, ImageData, SelectRequest
from sglrun.lang.chat_template import ChatTemplate
from sglrun.lang.hub import Task, current_hub, current_task, run_blocking
from sglrun.lang.ir import (
    SamplingParams,
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
)
from sglrun.lang.values import load_image, parse_dtype, split_reasoning

__all__ = ["Executor"]


def _declared_names(expr: SglExpr) -> list[str]:
    """Variables an expression will produce, so readers know to wait for them."""
    if isinstance(expr, (SglGen, SglSelect, SglVarScopeEnd)) and expr.name:
        return [expr.name]
    if isinstance(expr, SglSeparateReasoning) and expr.name:
        return [expr.name]
    if isinstance(expr, SglExprList):
        return [name for item in expr.expr_list for name in _declared_names(item)]
    return []


class Executor:
    """Holds one state's text, chat messages, variables and meta info, and executes
    expressions into it."""

    _visitors: dict[type, Callable[[Executor, Any], None]] = {}

    def __init__(
        self,
        backend: Backend,
        arguments: dict[str, Any],
        defaults: SamplingParams,
        chat_template: ChatTemplate,
        *,
        stream: bool = False,
        concurrent: bool = False,
        num_api_spec_tokens: int | None = None,
    ) -> None:
        self.backend = backend
        self.arguments = arguments
        self.defaults = defaults
        self.chat_template = chat_template
        self.stream = stream
        self.concurrent = concurrent
        self.num_api_spec_tokens = num_api_spec_tokens

        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self.cur_role_begin_pos = 0
        self.images_: list[ImageData] = []
        self.cur_images: list[ImageData] = []
        self.fork_start_text_pos = 0
        self.speculated_text = ""
        self.spec_terms: list[Any] | None = None  # an assistant turn being collected
        self._scope_starts: dict[str, int] = {}  # open var_scopes: name -> text position
        self.error_: BaseException | None = None
        self.finished = not stream  # a streaming run is live until the program returns

        self._cond = threading.Condition()
        self._queue: deque[SglExpr] = deque()
        self._busy = False
        self._pending: set[str] = set()
        self._streaming_vars: set[str] = set()
        # The greenlet (a thread's own, or a task on a hub) running the program itself: it
        # produces this state's variables, so it must never wait for one (that would wait
        # for itself).
        self.owner: greenlet.greenlet | None = None
        self._hub_waiters: list[tuple[Task, int]] = []
        self.forks: list[Executor] = []  # children: never outlive this state's program
        self._drainer: Task | None = None  # the task draining this (forked) state's queue

    # ----------------------------------------------------------------- submission
    def submit(self, expr: SglExpr | str) -> None:
        if isinstance(expr, str):
            expr = SglConstantText(expr)
        elif not isinstance(expr, SglExpr):
            raise InvalidArgumentError(
                f"cannot append {type(expr).__name__} to a program state; "
                "append a str or an sglrun primitive"
            )
        if self.error_ is not None:
            return
        if not self.concurrent:
            self._execute_guarded(expr)
            return
        with self._cond:
            self._pending.update(_declared_names(expr))
            self._queue.append(expr)
            if self._busy:
                return
            self._busy = True
        hub = current_hub()
        if hub is None:  # a fork appended to outside any program: run it now, here
            self._drain()
        else:  # forks are tasks of their program's hub
            self._drainer = hub.spawn(self._drain)

    def _drain(self) -> None:
        drained = False
        try:
            while True:
                with self._cond:
                    if not self._queue:
                        self._busy = False
                        self._notify_all()
                        drained = True
                        return
                    expr = self._queue.popleft()
                if self.error_ is None:
                    self._execute_guarded(expr)
        finally:
            if not drained:  # cancelled: nothing more runs, and nobody waits for it
                with self._cond:
                    self._queue.clear()
                    self._busy = False
                    self._notify_all()

    def _execute_guarded(self, expr: SglExpr) -> None:
        try:
            self.execute(expr)
        except Exception as exc:  # recorded, surfaced by error() and by variable reads
            self.fail(exc)
        finally:
            if self.stream or self.concurrent:
                with self._cond:
                    self._notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error_ is None:
                self.error_ = exc
            self._queue.clear()
            self._pending.clear()
            self._streaming_vars.clear()
            self._notify_all()

    def _wait(self) -> None:
        """Wait (holding ``_cond``) for a notify. A task on a hub parks instead of blocking
        the thread, so the hub runs the tasks that will notify it."""
        task = current_task()
        if task is None:
            self._cond.wait()
            return
        self._hub_waiters.append((task, task.token))
        self._cond.release()  # never park holding a lock another task may need
        try:
            task.hub.park()
        finally:
            self._cond.acquire()

    def _notify_all(self) -> None:
        self._cond.notify_all()
        if self._hub_waiters:
            waiters, self._hub_waiters = self._hub_waiters, []
            for waiter, token in waiters:
                waiter.hub.wake(waiter, token)

    def call_backend(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the backend; on a hub, one that would block the thread runs on a worker."""
        if self.backend.cooperative and "on_chunk" not in kwargs:
            return method(*args, **kwargs)
        return run_blocking(method, *args, **kwargs)

    def sync(self) -> None:
        """Wait until every queued expression has run."""
        if not self.concurrent:
            return
        with self._cond:
            while self._busy:
                self._wait()

    def end(self, *, wait: bool = True) -> None:
        """The program returned: wait for its forks (they never outlive it), then readers
        stop waiting for more text. ``wait=False`` after a cancellation or a kill."""
        if wait:
            self.sync()
            for child in self.forks:
                child.end()
        with self._cond:
            self.finished = True
            self._notify_all()

    def cancel(self, error: BaseException) -> None:
        """Stop this state and every fork of it: queued expressions are dropped and a fork
        parked on the model raises ``Cancelled`` where it waits."""
        self.fail(error)
        for child in self.forks:
            child.cancel(error)
        drainer = self._drainer
        if drainer is not None and not drainer.done and drainer is not greenlet.getcurrent():
            drainer.hub.cancel(drainer, error)

    # ----------------------------------------------------------------- reading
    def get_var(self, name: str) -> Any:
        with self._cond:
            while self._still_coming(name):
                self._wait()
            if name in self.variables and name not in self._streaming_vars:
                return self.variables[name]
            raise VariableNotProducedError(name, self.error_)

    def _still_coming(self, name: str) -> bool:
        if self.error_ is not None:
            return False
        if not self.concurrent and greenlet.getcurrent() is self.owner:
            return False
        if name in self._streaming_vars:
            return True
        if name in self.variables:
            return False
        return name in self._pending or not self.finished

    def get_meta_info(self, name: str) -> Any:
        with self._cond:
            while self._still_coming(name):
                self._wait()
            return self.meta_info.get(name)

    def set_var(self, name: str, value: Any) -> None:
        with self._cond:
            self.variables[name] = value
            self._pending.discard(name)
            self._notify_all()

    def _produce(self, name: str | None, value: Any, meta: Any = None) -> None:
        if name is None:
            return
        with self._cond:
            self.variables[name] = value
            if meta is not None:
                self.meta_info[name] = meta
            self._pending.discard(name)
            self._streaming_vars.discard(name)
            self._notify_all()

    def wait_for_change(self, seen: int, var: str | None) -> tuple[str, bool]:
        """For streaming readers: block until text (or ``var``) grows past ``seen``; return
        the new piece and whether nothing more will come."""
        with self._cond:
            while True:
                current = self._current(var)
                done = self._stream_done(var)
                if len(current) > seen or done:
                    return current[seen:], done
                self._wait()

    def _current(self, var: str | None) -> str:
        if var is None:
            return self.text_
        value = self.variables.get(var, "")
        return value if isinstance(value, str) else str(value)

    def _stream_done(self, var: str | None) -> bool:
        if self.error_ is not None or self.finished:
            return True
        if var is None:
            return False
        return var in self.variables and var not in self._streaming_vars

    # ----------------------------------------------------------------- dispatch
    def execute(self, expr: SglExpr) -> None:
        visitor = self._visitors.get(type(expr))
        if visitor is None:
            visitor = getattr(type(self), f"visit_{expr.kind}", None)
            if visitor is None:
                raise UnsupportedNodeError(f"no interpreter rule for {type(expr).__name__}")
            self._visitors[type(expr)] = visitor
        visitor(self, expr)

    def visit_expr_list(self, expr: SglExprList) -> None:
        for item in expr.expr_list:
            self.execute(item)

    def visit_constant_text(self, expr: SglConstantText) -> None:
        if self.spec_terms is not None:
            from sglrun.lang.speculative import SpecTerm

            self.spec_terms.append(SpecTerm(text=str(expr.value)))
            return
        self.fill(str(expr.value))

    def fill(self, value: str) -> None:
        if self.speculated_text:
            self.speculated_text = (
                self.speculated_text[len(value) :] if self.speculated_text.startswith(value) else ""
            )
        self.text_ += value

    # ----------------------------------------------------------------- gen
    def resolve_params(self, overrides: SamplingParams) -> SamplingParams:
        params = self.defaults.overridden_by(overrides)
        return params.with_extra_stop(self.chat_template.stop_str)

    def _request(self, params: SamplingParams, name: str | None = None) -> GenerateRequest:
        return GenerateRequest(
            prompt=self.text_,
            params=params,
            messages=self.messages_,
            role=self.cur_role,
            role_text=self.text_[self.cur_role_begin_pos :] if self.cur_role else "",
            images=self.images_,
            name=name,
        )

    def visit_gen(self, expr: SglGen) -> None:
        params = self.resolve_params(expr.sampling_params)
        name = expr.name
        if self.spec_terms is not None:
            from sglrun.lang.speculative import SpecTerm

            self.spec_terms.append(SpecTerm(name=name, params=params, is_gen=True))
            return
        if self.num_api_spec_tokens and not self.backend.is_chat_model and not self.stream:
            text, meta = self._speculative_gen(params)
            self.text_ += text
            self._produce(name, text, meta)
            return
        started = time.perf_counter()
        if self.stream and params.n in (None, 1):
            result = self._streamed_gen(name, params)
        else:
            result = self.call_backend(self.backend.generate, self._request(params, name))
        meta = dict(result.meta_info)
        meta.setdefault("e2e_latency", time.perf_counter() - started)
        text = result.text
        if isinstance(text, list):
            self.fill(text[0] if text else "")
            value: Any = [parse_dtype(t, params.dtype, name) for t in text]
        else:
            if not self.stream or params.n not in (None, 1):
                self.fill(text)
            value = parse_dtype(text, params.dtype, name)
        self._produce(name, value, meta)

    def _streamed_gen(self, name: str | None, params: SamplingParams) -> Any:
        key = name
        with self._cond:
            if key is not None:
                self.variables[key] = ""
                self._streaming_vars.add(key)

        def on_chunk(piece: str) -> None:
            with self._cond:
                self.text_ += piece
                if key is not None:
                    self.variables[key] += piece
                self._notify_all()

        result = self.call_backend(
            self.backend.generate, self._request(params, name), on_chunk=on_chunk
        )
        # Backends report the final text too; trust it if streaming delivered less.
        final = result.text if isinstance(result.text, str) else ""
        streamed = self.variables.get(key, "") if key is not None else final
        if key is not None and final != streamed and final.startswith(streamed):
            on_chunk(final[len(streamed) :])
        return result

    def _speculative_gen(self, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        """Completion-model speculation: one long generation serves the following gens."""
        meta: dict[str, Any] = {}
        stops = [s for s in (params.stop or ()) if s]
        if not self.speculated_text:
            spec = SamplingParams().overridden_by(params)
            spec.max_new_tokens = max(params.max_new_tokens or 0, self.num_api_spec_tokens or 0)
            spec.stop = ()
            result = self.call_backend(self.backend.generate, self._request(spec))
            self.speculated_text = result.text if isinstance(result.text, str) else result.text[0]
            meta = dict(result.meta_info)
        positions = [self.speculated_text.find(s) for s in stops]
        positions = [p for p in positions if p >= 0]
        cut = min(positions) if positions else len(self.speculated_text)
        text = self.speculated_text[:cut]
        self.speculated_text = self.speculated_text[cut:]
        return text, meta

    # ----------------------------------------------------------------- select
    def visit_select(self, expr: SglSelect) -> None:
        if not expr.choices:
            raise InvalidArgumentError(f"select {expr.name!r} needs at least one choice")
        if self.spec_terms is not None:
            raise ProgramError(
                f"select {expr.name!r} cannot run inside a speculative assistant turn "
                "(num_api_spec_tokens): put it in its own turn"
            )
        request = SelectRequest(
            prompt=self.text_,
            choices=list(expr.choices),
            temperature=expr.temperature,
            choices_method=expr.choices_method,
            messages=self.messages_,
            role=self.cur_role,
            role_text=self.text_[self.cur_role_begin_pos :] if self.cur_role else "",
            images=self.images_,
            name=expr.name,
        )
        decision = self.call_backend(self.backend.select, request)
        self.fill(decision.decision)
        self._produce(expr.name, decision.decision, decision.meta_info)

    # ----------------------------------------------------------------- roles
    def visit_role_begin(self, expr: SglRoleBegin) -> None:
        if self.cur_role is not None:
            raise ProgramError(
                f"cannot begin role {expr.role!r} inside role {self.cur_role!r}: "
                "roles cannot nest; end the current one first"
            )
        if not self.messages_ and expr.role != "system":
            default_system = self.chat_template.default_system_prompt
            if default_system:
                self.visit_role_begin(SglRoleBegin("system"))
                self.fill(default_system)
                self.visit_role_end(SglRoleEnd("system"))
        self.cur_role = expr.role
        prefix, _ = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self.text_ += prefix
        self.cur_role_begin_pos = len(self.text_)
        if expr.role == "assistant" and self.num_api_spec_tokens and self.backend.is_chat_model:
            self.spec_terms = []  # collect the turn; the model writes it whole at role end

    def visit_role_end(self, expr: SglRoleEnd) -> None:
        if self.cur_role != expr.role:
            raise ProgramError(
                f"cannot end role {expr.role!r}: the open role is {self.cur_role!r}"
            )
        if self.spec_terms is not None:
            from sglrun.lang.speculative import fill_turn

            terms, self.spec_terms = self.spec_terms, None
            fill_turn(self, terms)
        content = self.text_[self.cur_role_begin_pos :].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self.cur_role = None
        self.text_ += suffix
        if self.cur_images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
            parts += [
                {"type": "image_url", "image_url": {"url": image.data_url}}
                for image in self.cur_images
            ]
            self.messages_.append({"role": expr.role, "content": parts})
            self.cur_images = []
        else:
            self.messages_.append({"role": expr.role, "content": content})

    # ----------------------------------------------------------------- media
    def visit_image(self, expr: SglImage) -> None:
        image = load_image(expr.path)
        self.images_.append(image)
        self.cur_images.append(image)
        self.text_ += self.chat_template.image_token

    def visit_video(self, expr: SglVideo) -> None:
        raise UnsupportedCapabilityError(
            "video", self.backend.name, "sglrun ships no video decoder; pass frames as images"
        )

    # ----------------------------------------------------------------- variables
    def visit_variable(self, expr: SglVariable) -> None:
        source = expr.source
        executor = getattr(source, "executor", source)
        self.fill(str(executor.get_var(expr.name)))

    def visit_var_scope_begin(self, expr: SglVarScopeBegin) -> None:
        self._scope_starts[expr.name] = len(self.text_)

    def visit_var_scope_end(self, expr: SglVarScopeEnd) -> None:
        starts = self._scope_starts
        if expr.name not in starts:
            raise ProgramError(f"var_scope {expr.name!r} ended but never began")
        self._produce(expr.name, self.text_[starts.pop(expr.name) :])

    def visit_commit_lazy(self, expr: SglExpr) -> None:
        """Nothing is lazy here: every expression is already sent when executed."""

    def visit_concate_and_append(self, expr: SglConcateAndAppend) -> None:
        pieces = []
        for state in expr.states:
            child: Executor = state.executor
            child.sync()
            if child.error_ is not None:
                raise child.error_
            pieces.append(child.text_[child.fork_start_text_pos :])
        self.fill("".join(pieces))

    def visit_separate_reasoning(self, expr: SglSeparateReasoning) -> None:
        target = expr.expr
        if isinstance(target, SglExprList):
            for item in target.expr_list:
                self.visit_separate_reasoning(SglSeparateReasoning(expr.model_type, item))
            return
        name = getattr(target, "name", None)
        if not isinstance(target, (SglGen, SglSelect)) or name is None:
            return
        full = str(self.variables.get(name, ""))
        reasoning, answer = split_reasoning(full, expr.model_type)
        self._produce(name, answer)
        self._produce(f"{name}_reasoning_content", reasoning)
        if self.text_.endswith(full):
            self.text_ = self.text_[: len(self.text_) - len(full)] + answer

    # ----------------------------------------------------------------- fork
    def fork(self, size: int) -> list[Executor]:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgumentError(f"fork size must be a positive int, not {size!r}")
        self.sync()
        children = []
        for _ in range(size):
            child = Executor(
                self.backend,
                self.arguments,
                self.defaults,
                self.chat_template,
                concurrent=True,
            )
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.images_ = list(self.images_)
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        self.forks.extend(children)
        return children
