"""``state.stream_executor``: SGLang's view of the machinery under a program state.

SGLang programs and notebooks reach past ``ProgramState`` into its ``StreamExecutor``: they read
``variables``, ``meta_info`` and ``text_``, wait on ``variable_event[name]``, or check
``is_finished``. sglrun's executor keeps its data in a ``Frame`` and its waiting in a
``StateSync``, so this view answers those reads from them; it holds no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglrun.lang.backend import Backend
    from sglrun.lang.state import ProgramState
    from sglrun.lang.sync import StateSync

__all__ = ["StreamExecutorView", "VariableEvent"]


class VariableEvent:
    """Set once variable ``name`` is produced (or the program failed or ended without it):
    the part of ``threading.Event`` programs use."""

    def __init__(self, sync: StateSync, name: str) -> None:
        self._sync = sync
        self._name = name

    def _settled(self) -> bool:
        sync = self._sync
        if sync.error is not None or sync.finished:
            return True
        return self._name in sync.frame.variables and self._name not in sync.streaming

    def is_set(self) -> bool:
        with self._sync.cond:
            return self._settled()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set (at most ``timeout`` seconds from a thread); True once set."""
        sync = self._sync
        with sync.cond:
            if timeout is not None:
                return sync.cond.wait_for(self._settled, timeout)
            while not self._settled():
                sync.wait()
            return True


class _VariableEvents(Mapping[str, VariableEvent]):
    def __init__(self, sync: StateSync) -> None:
        self._sync = sync

    def _names(self) -> set[str]:
        return set(self._sync.frame.variables) | self._sync.pending | self._sync.streaming

    def __getitem__(self, name: str) -> VariableEvent:
        return VariableEvent(self._sync, name)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names()))

    def __len__(self) -> int:
        return len(self._names())


class StreamExecutorView:
    """What SGLang's ``StreamExecutor`` offers programs, read from one sglrun state."""

    def __init__(self, state: ProgramState) -> None:
        self._state = state
        self._executor = state.executor

    @property
    def backend(self) -> Backend:
        return self._executor.backend

    @property
    def arguments(self) -> dict[str, Any]:
        return self._executor.arguments

    @property
    def stream(self) -> bool:
        return self._executor.stream

    @property
    def chat_template(self) -> Any:
        return self._executor.chat_template

    @property
    def variables(self) -> dict[str, Any]:
        return self._executor.frame.variables

    @property
    def meta_info(self) -> dict[str, Any]:
        return self._executor.frame.meta_info

    @property
    def variable_event(self) -> Mapping[str, VariableEvent]:
        return _VariableEvents(self._executor.sync)

    @property
    def text_(self) -> str:
        return self._executor.frame.text

    @property
    def messages_(self) -> list[dict[str, Any]]:
        return self._executor.frame.messages

    @property
    def is_finished(self) -> bool:
        sync = self._executor.sync
        return sync.finished or sync.error is not None

    @property
    def error_(self) -> BaseException | None:
        return self._executor.sync.error

    def text(self) -> str:
        return self._state.text()

    def messages(self) -> list[dict[str, Any]]:
        return self._state.messages()

    def error(self) -> BaseException | None:
        return self._state.error()

    def sync(self) -> None:
        self._state.sync()

    def get_var(self, name: str) -> Any:
        return self._state.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self._state.set_var(name, value)

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        if timeout is not None and not self.variable_event[name].wait(timeout):
            raise TimeoutError(f"timed out waiting for variable {name!r}")
        return self._state.get_meta_info(name)
