"""``ProgramState``: what a program's ``s`` is, and what ``run`` returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sglrun.errors import InvalidArgumentError, ProgramError
from sglrun.lang.interpreter import Executor
from sglrun.lang.ir import (
    SglConcateAndAppend,
    SglExpr,
    SglExprList,
    SglRoleBegin,
    SglRoleEnd,
    SglVarScopeBegin,
    SglVarScopeEnd,
)

__all__ = ["ProgramState", "ProgramStateGroup"]


class ProgramState:
    """The state of one program: append with ``+=``, read variables with ``s["x"]``."""

    __slots__ = ("executor", "ret_value", "__weakref__")

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.ret_value: Any = None

    # ------------------------------------------------------------ appending
    def __iadd__(self, other: SglExpr | str) -> ProgramState:
        """``s += expr``: run a primitive (or append text) in this state."""
        if other is None:
            raise InvalidArgumentError("cannot append None to a program state")
        self.executor.submit(other)
        return self

    def _role(self, name: str, expr: SglExpr | str | None) -> Any:
        if expr is not None:
            role_expr = SglExprList([SglRoleBegin(name), _as_expr(expr), SglRoleEnd(name)])
            self.executor.submit(role_expr)
            return role_expr
        return self._role_scope(name)

    @contextmanager
    def _role_scope(self, name: str) -> Iterator[None]:
        self.executor.submit(SglRoleBegin(name))
        yield
        self.executor.submit(SglRoleEnd(name))

    def system(self, expr: SglExpr | str | None = None) -> Any:
        """A system turn: ``s.system("...")``, or ``with s.system():`` around its parts."""
        return self._role("system", expr)

    def user(self, expr: SglExpr | str | None = None) -> Any:
        """A user turn: ``s.user("...")``, or ``with s.user():`` around its parts."""
        return self._role("user", expr)

    def assistant(self, expr: SglExpr | str | None = None) -> Any:
        """An assistant turn: ``s.assistant(sgl.gen(...))``, or ``with s.assistant():``."""
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """``with s.var_scope("x"):``: the text appended inside becomes variable ``x``."""
        self.executor.submit(SglVarScopeBegin(name))
        yield
        self.executor.submit(SglVarScopeEnd(name))

    # ------------------------------------------------------------ fork / copy
    def fork(
        self, size: int = 1, position_ids_offset: list[int] | None = None
    ) -> ProgramStateGroup:
        """``size`` copies of this state that run concurrently; ``join`` brings them back."""
        children = [ProgramState(executor) for executor in self.executor.fork(size)]
        return ProgramStateGroup(children, self)

    @contextmanager
    def copy(self, position_ids_offset: list[int] | None = None) -> Iterator[ProgramState]:
        """``with s.copy() as c:``: one fork, joined when the block ends."""
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join()

    # ------------------------------------------------------------ reading
    def text(self) -> str:
        """The whole text: prompt and generations (waits for queued expressions)."""
        self.executor.wait_idle()
        return self.executor.frame.text

    def messages(self) -> list[dict[str, Any]]:
        """The finished chat turns, OpenAI-format (waits for queued expressions)."""
        self.executor.wait_idle()
        return self.executor.frame.messages

    def sync(self) -> None:
        """Wait until every queued expression has run."""
        self.executor.wait_idle()

    def error(self) -> BaseException | None:
        """What made the program fail (its own exception or a backend's), or None."""
        self.executor.wait_idle()
        return self.executor.sync.error

    def get_var(self, name: str) -> Any:
        """Variable ``name``, waiting while it is still being produced; raises
        ``VariableNotProducedError`` (a ``KeyError``) naming it and the cause if it never
        will be."""
        return self.executor.sync.get(name)

    def set_var(self, name: str, value: Any) -> None:
        """Set variable ``name`` (readers waiting for it wake)."""
        self.executor.sync.produce(name, value)

    def get_meta_info(self, name: str) -> Any:
        """The meta info of variable ``name`` (tokens, finish reason, logprobs...), or None."""
        return self.executor.sync.get_meta(name)

    def variables(self) -> dict[str, Any]:
        """Every variable the program produced (waits for queued expressions)."""
        self.executor.wait_idle()
        return dict(self.executor.frame.variables)

    def meta_infos(self) -> dict[str, Any]:
        """Every variable's meta info (waits for queued expressions)."""
        self.executor.wait_idle()
        return dict(self.executor.frame.meta_info)

    def text_so_far(self) -> str:
        """The text as it stands now, without waiting (a live display of a running row)."""
        return self.executor.frame.text

    def failed(self) -> bool:
        """Whether the program has failed so far, without waiting."""
        return self.executor.sync.error is not None

    def __getitem__(self, name: str) -> Any:
        return self.executor.sync.get(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.sync.produce(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.executor.frame.variables

    # ------------------------------------------------------------ streaming
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Yield text as it is generated (with ``run(stream=True)``); otherwise the whole
        text (or variable) once."""
        executor = self.executor
        if not executor.stream:  # as SGLang: the text, or the variable's own value (a list...)
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        seen = 0
        while True:
            piece, done = executor.sync.wait_for_change(seen, var_name)
            seen += len(piece)
            if piece:
                yield piece
            if done:
                return

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        """``text_iter`` for asyncio code. Streaming with ``return_meta_data`` and a variable,
        each piece comes as ``(piece, meta_info)``: the meta info so far, with the logprobs of
        just this piece (SGLang's incremental keys). Not streaming: the value, once, alone."""
        import asyncio  # imported here: it costs start-up time to every other user

        executor = self.executor
        loop = asyncio.get_running_loop()
        if not executor.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        seen = 0
        with_meta = return_meta_data and var_name is not None
        taken: dict[str, int] | None = {} if with_meta else None
        while True:
            piece, done, meta = await loop.run_in_executor(
                None, executor.sync.wait_for_piece, seen, var_name, taken
            )
            seen += len(piece)
            if piece:
                yield (piece, meta) if with_meta else piece
            if done:
                return

    @property
    def stream_executor(self) -> Any:
        """SGLang's name for the machinery under a state; programs read its ``variables``,
        ``meta_info``, ``variable_event`` (one event per variable, set once it is produced),
        ``text_``, ``messages_``, ``is_finished`` and ``error_``."""
        from sglrun.lang.executor_view import StreamExecutorView

        return StreamExecutorView(self)

    def __repr__(self) -> str:
        return f"ProgramState({self.text()})"  # as SGLang: the text itself, unquoted


class ProgramStateGroup:
    """The states made by ``fork``: append to all at once, index one, ``join`` them back."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState) -> None:
        self.states = states
        self.src_state = src_state

    def __getitem__(self, index: int) -> ProgramState:
        return self.states[index]

    def __setitem__(self, index: int, value: ProgramState) -> None:
        if self.states[index] is not value:
            raise ProgramError("fork states cannot be replaced; use forks[i] += ...")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ProgramStateGroup:
        if isinstance(other, (SglExpr, str)):
            for state in self.states:
                state += other
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise InvalidArgumentError(
                    f"appending {len(other)} items to {len(self.states)} forks"
                )
            for state, item in zip(self.states, other):
                state += item
        elif callable(other):
            fn: Callable[[int], Any] = other
            for index, state in enumerate(self.states):
                state += fn(index)
        else:
            raise InvalidArgumentError(
                f"cannot append {type(other).__name__} to forks; "
                "use an expression, a list or a lambda i: ..."
            )
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for the forks and bring them back: their new variables become lists in the
        source state (``gather_variable``), or their text is appended to it
        (``concate_and_append``). A failed fork fails the source."""
        source = self.src_state.executor
        if mode == "gather_variable":
            known = set(source.frame.variables)
            for state in self.states:
                child = state.executor
                child.wait_idle()
                if child.sync.error is not None:
                    source.fail(child.sync.error)
                frame = child.frame
                new = {name: frame.variables[name] for name in frame.variables.keys() - known}
                metas = {name: frame.meta_info[name] for name in new if name in frame.meta_info}
                source.sync.merge(new, metas)
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(self.states)
            source.wait_idle()
        else:
            raise InvalidArgumentError(
                f"join mode must be 'gather_variable' or 'concate_and_append', not {mode!r}"
            )


def _as_expr(value: SglExpr | str) -> SglExpr:
    from sglrun.lang.ir import SglConstantText

    if isinstance(value, SglExpr):
        return value
    if isinstance(value, str):
        return SglConstantText(value)
    raise InvalidArgumentError(f"cannot use {type(value).__name__} in a role; pass str or expr")
