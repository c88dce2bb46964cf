"""``Frame``: the data of one program state, and nothing else.

The text so far, the finished chat turns, the open role, the variables and their meta info,
the images, and the interpreter's bookkeeping (open ``var_scope``s, speculative text). A fork
starts from a copy (``forked``); who may read it when is ``StateSync``'s business, what is
written into it ``Executor``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sglrun.lang.backend import ImageData

__all__ = ["Frame"]


@dataclasses.dataclass(slots=True)
class Frame:
    text: str = ""
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    variables: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    role: str | None = None  # the open role
    role_begin: int = 0  # where the open role's text starts in ``text``
    images: list[ImageData] = dataclasses.field(default_factory=list)
    turn_images: list[ImageData] = dataclasses.field(default_factory=list)  # of the open role
    fork_start: int = 0  # where a fork's own text starts
    speculated: str = ""  # completion-model speculation not consumed yet
    spec_terms: list[Any] | None = None  # a chat assistant turn being collected
    scope_starts: dict[str, int] = dataclasses.field(default_factory=dict)  # open var_scopes

    def forked(self) -> Frame:
        """A fork's starting point: this text, turns and variables, its own from now on."""
        return Frame(
            text=self.text,
            messages=list(self.messages),
            variables=dict(self.variables),
            meta_info=dict(self.meta_info),
            role=self.role,
            role_begin=self.role_begin,
            images=list(self.images),
            fork_start=len(self.text),
        )

    @property
    def role_text(self) -> str:
        """The text of the open role so far ("" when no role is open)."""
        return self.text[self.role_begin :] if self.role else ""
