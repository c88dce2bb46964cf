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
        return self._role("system", expr)

    def user(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: SglExpr | str | None = None) -> Any:
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self.executor.submit(SglVarScopeBegin(name))
        yield
        self.executor.submit(SglVarScopeEnd(name))

    # ------------------------------------------------------------ fork / copy
    def fork(
        self, size: int = 1, position_ids_offset: list[int] | None = None
    ) -> ProgramStateGroup:
        children = [ProgramState(executor) for executor in self.executor.fork(size)]
        return ProgramStateGroup(children, self)

    @contextmanager
    def copy(self, position_ids_offset: list[int] | None = None) -> Iterator[ProgramState]:
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join()

    # ------------------------------------------------------------ reading
    def text(self) -> str:
        self.executor.sync()
        return self.executor.text_

    def messages(self) -> list[dict[str, Any]]:
        self.executor.sync()
        return self.executor.messages_

    def sync(self) -> None:
        self.executor.sync()

    def error(self) -> BaseException | None:
        self.executor.sync()
        return self.executor.error_

    def get_var(self, name: str) -> Any:
        return self.executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        return self.executor.get_meta_info(name)

    def variables(self) -> dict[str, Any]:
        """Every variable the program produced (waits for the program to finish)."""
        self.executor.sync()
        return dict(self.executor.variables)

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.executor.variables

    # ------------------------------------------------------------ streaming
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Yield text as it is generated (with ``run(stream=True)``); otherwise the whole
        text (or variable) once."""
        executor = self.executor
        if not executor.stream:
            yield self.text() if var_name is None else str(self.get_var(var_name))
            return
        seen = 0
        while True:
            piece, done = executor.wait_for_change(seen, var_name)
            seen += len(piece)
            if piece:
                yield piece
            if done:
                return

    async def text_async_iter(
        self, var_name: str | None = None, return_meta_data: bool = False
    ) -> AsyncIterator[Any]:
        import asyncio  # imported here: it costs start-up time to every other user

        executor = self.executor
        loop = asyncio.get_running_loop()
        if not executor.stream:
            value = self.text() if var_name is None else str(self.get_var(var_name))
            yield (value, executor.meta_info.get(var_name)) if return_meta_data else value
            return
        seen = 0
        while True:
            piece, done = await loop.run_in_executor(
                None, executor.wait_for_change, seen, var_name
            )
            seen += len(piece)
            if piece:
                if return_meta_data:
                    yield piece, executor.meta_info.get(var_name) if var_name else None
                else:
                    yield piece
            if done:
                return

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


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
        source = self.src_state.executor
        if mode == "gather_variable":
            known = set(source.variables)
            for state in self.states:
                child = state.executor
                child.sync()
                if child.error_ is not None:
                    source.fail(child.error_)
                for name in child.variables.keys() - known:
                    gathered = source.variables.setdefault(name, [])
                    gathered.append(child.variables[name])
                    if name in child.meta_info:
                        source.meta_info.setdefault(name, []).append(child.meta_info[name])
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(self.states)
            source.sync()
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
