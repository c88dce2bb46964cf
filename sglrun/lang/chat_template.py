"""Chat templates: how role turns are framed in the prompt text a model sees.

Same public semantics as SGLang's ``sglang.lang.chat_template``: a template is a table of
``(prefix, suffix)`` strings per role, a registry maps names to templates, and matching
functions pick a template from a model path. The interpreter frames each ``system()``,
``user()`` and ``assistant()`` block with ``get_prefix_and_suffix``; ``get_prompt`` renders a
whole OpenAI-style message list the same way, for backends that take plain text.

Stdlib only, so importing it never pulls in a model runtime.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sglrun.errors import InvalidArgumentError

__all__ = [
    "ChatTemplate",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "list_chat_templates",
    "register_chat_template",
    "register_chat_template_matching_function",
]

#: "plain": every role uses its own prefix and suffix.
#: "llama2": a leading system turn is folded into the first user turn (Llama-2, Mistral and
#: Gemma have no separate system turn), i.e. the system text opens with the user prefix and
#: the user turn right after it drops its prefix.
_STYLES = ("plain", "llama2")
_ROLES = ("system", "user", "assistant")

MatchingFunction = Callable[[str], "str | ChatTemplate | None"]


@dataclass(frozen=True)
class ChatTemplate:
    """Role framing of one model family; immutable so a shared instance cannot drift."""

    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] = ()
    image_token: str = "<image>"
    style: str = "plain"

    def __post_init__(self) -> None:
        # Fail at definition time, not half-way through rendering a prompt.
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgumentError(f"chat template name must be a non-empty str: {self.name!r}")
        if self.style not in _STYLES:
            raise InvalidArgumentError(
                f"chat template {self.name!r}: unknown style {self.style!r} "
                f"(expected one of: {', '.join(_STYLES)})"
            )
        missing = [r for r in _ROLES if r not in self.role_prefix_and_suffix]
        if missing:
            raise InvalidArgumentError(
                f"chat template {self.name!r}: role_prefix_and_suffix lacks {', '.join(missing)}"
            )
        if isinstance(self.stop_str, str):
            object.__setattr__(self, "stop_str", (self.stop_str,))
        else:
            object.__setattr__(self, "stop_str", tuple(self.stop_str))

    def get_prefix_and_suffix(self, role: str, hist_messages: Sequence[Any]) -> tuple[str, str]:
        """Framing of a ``role`` turn that follows ``hist_messages``; unknown roles get none."""
        prefix, suffix = self.role_prefix_and_suffix.get(role, ("", ""))
        if self.style == "llama2":
            if role == "system" and not hist_messages:
                user_prefix, _ = self.role_prefix_and_suffix.get("user", ("", ""))
                return user_prefix + prefix, suffix
            if (
                role == "user"
                and len(hist_messages) == 1
                and hist_messages[0].get("role") == "system"
            ):
                return "", suffix
        return prefix, suffix

    def get_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Render OpenAI-format ``messages`` as prompt text ready for the model to answer.

        Like the models' own tokenizer templates: a template's default system prompt is
        inserted when the conversation does not start with a system message (and replaces a
        system message whose content is ``None``); an assistant message with content ``None``
        is an open turn (prefix only); and when the last message is not the assistant's, the
        assistant prefix is appended so the text ends where the model should continue.
        """
        turns = self._effective_turns(messages)
        prompt: list[str] = []
        for i, (role, content) in enumerate(turns):
            prefix, suffix = self.get_prefix_and_suffix(
                role, [{"role": r, "content": c} for r, c in turns[:i]]
            )
            if content is None:  # open assistant turn
                if i != len(turns) - 1:
                    raise InvalidArgumentError(
                        "only the last message may be an assistant turn with content None"
                    )
                prompt.append(prefix)
                break
            prompt.append(f"{prefix}{content}{suffix}")
        else:
            if not turns or turns[-1][0] != "assistant":
                prompt.append(self.get_prefix_and_suffix("assistant", turns)[0])
        return "".join(prompt)

    def _effective_turns(self, messages: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
        """(role, text) pairs after applying the default system prompt and flattening content."""
        if not isinstance(messages, list):
            raise InvalidArgumentError(f"messages must be a list of dicts, got {messages!r}")
        turns: list[tuple[str, str | None]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidArgumentError(
                    f"message {i} must be a dict with a str 'role', got {message!r}"
                )
            role, content = message["role"], message.get("content")
            if role == "system" and content is None:
                if self.default_system_prompt is None:
                    continue
                content = self.default_system_prompt
            elif content is not None:
                content = self._flatten(content)
            elif role != "assistant":
                content = ""
            turns.append((role, content))
        if self.default_system_prompt is not None and (not turns or turns[0][0] != "system"):
            turns.insert(0, ("system", self.default_system_prompt))
        return turns

    def _flatten(self, content: Any) -> str:
        """OpenAI content parts -> text, images replaced by this model's image token."""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                elif kind in ("image_url", "image"):
                    pieces.append(self.image_token)
                else:
                    raise InvalidArgumentError(f"unsupported message content part: {part!r}")
            return "".join(pieces)
        raise InvalidArgumentError(f"message content must be str or list, got {content!r}")


_lock = threading.Lock()
_templates: dict[str, ChatTemplate] = {}
_matchers: list[MatchingFunction] = []


def register_chat_template(template: ChatTemplate) -> None:
    """Add ``template`` under its name; a later registration replaces an earlier one."""
    if not isinstance(template, ChatTemplate):
        raise InvalidArgumentError(f"expected a ChatTemplate, got {type(template).__name__}")
    with _lock:
        _templates[template.name] = template


def register_chat_template_matching_function(func: MatchingFunction) -> MatchingFunction:
    """Add a ``model_path -> template name | None`` rule; returns ``func`` to act as decorator.

    Rules registered later are tried first, so user rules override the built-in ones.
    """
    if not callable(func):
        raise InvalidArgumentError(f"matching function must be callable, got {func!r}")
    with _lock:
        if func in _matchers:
            _matchers.remove(func)
        _matchers.append(func)
    return func


def list_chat_templates() -> list[str]:
    """Sorted names of all registered templates."""
    with _lock:
        return sorted(_templates)


def get_chat_template(name: str) -> ChatTemplate:
    """The template registered as ``name``; the error lists the known names to pick from."""
    with _lock:
        template = _templates.get(name)
    if template is None:
        raise InvalidArgumentError(
            f"unknown chat template {name!r}; known templates: {', '.join(list_chat_templates())}"
        )
    return template


def get_chat_template_by_model_path(model_path: str) -> ChatTemplate:
    """First template a matching function picks for ``model_path``, else ``default``."""
    with _lock:
        matchers = list(reversed(_matchers))
    for matcher in matchers:
        found = matcher(model_path)
        if found is None:
            continue
        # SGLang's matchers return the template itself; accept that as well as a name.
        return found if isinstance(found, ChatTemplate) else get_chat_template(found)
    return get_chat_template("default")


# --- Built-in templates -------------------------------------------------------------------

_CHATML = {
    "system": ("<|im_start|>system\n", "<|im_end|>\n"),
    "user": ("<|im_start|>user\n", "<|im_end|>\n"),
    "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
}
_NO_FRAMING = {role: ("", "") for role in _ROLES}

for _template in (
    ChatTemplate(
        name="default",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("SYSTEM:", "\n"),
            "user": ("USER:", "\n"),
            "assistant": ("ASSISTANT:", "\n"),
        },
    ),
    # Chat APIs take structured messages, so the prompt text carries no framing of its own.
    ChatTemplate(name="chatgpt", default_system_prompt=None, role_prefix_and_suffix=_NO_FRAMING),
    ChatTemplate(name="claude", default_system_prompt=None, role_prefix_and_suffix=_NO_FRAMING),
    ChatTemplate(
        name="chatml",
        default_system_prompt=None,
        role_prefix_and_suffix=_CHATML,
        stop_str=("<|im_end|>",),
    ),
    ChatTemplate(
        name="smollm2",
        default_system_prompt=(
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        ),
        role_prefix_and_suffix=_CHATML,
        stop_str=("<|im_end|>",),
    ),
    ChatTemplate(
        name="qwen",
        default_system_prompt="You are a helpful assistant.",
        role_prefix_and_suffix=_CHATML,
        stop_str=("<|im_end|>",),
    ),
    ChatTemplate(
        name="llama-2-chat",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", " </s><s>"),
        },
        stop_str=("</s>",),
        style="llama2",
    ),
    ChatTemplate(
        name="llama-3-instruct",
        default_system_prompt=None,
        role_prefix_and_suffix={
            role: (f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
            for role in _ROLES
        },
        stop_str=("<|eot_id|>",),
        image_token="<|image|>",
    ),
    # Mistral's template has no system turn: the system text opens the first [INST] block.
    ChatTemplate(
        name="mistral",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", "\n\n"),
            "user": ("[INST] ", " [/INST]"),
            "assistant": ("", "</s>"),
        },
        stop_str=("</s>",),
        style="llama2",
    ),
    # Gemma has no system role either; its template prepends the system text to the first
    # user turn. The model's turns are labelled "model", not "assistant".
    ChatTemplate(
        name="gemma",
        default_system_prompt=None,
        role_prefix_and_suffix={
            "system": ("", "\n\n"),
            "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
            "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n"),
        },
        stop_str=("<end_of_turn>",),
        style="llama2",
    ),
):
    register_chat_template(_template)


# --- Built-in matching -------------------------------------------------------------------

_OPENAI_NAME = re.compile(r"^(chatgpt|gpt-3\.5|gpt-4|gpt-5|o[134])(?![a-z0-9])")


def _match_name(name: str) -> str | None:
    """Template for one lower-cased path or file name; most specific families first."""
    if "smollm" in name:
        return "smollm2"
    if "qwen" in name:
        return "qwen"
    if ("llama-3" in name or "llama3" in name) and "instruct" in name:
        return "llama-3-instruct"
    if "llama-2" in name and "chat" in name:
        return "llama-2-chat"
    if "mistral" in name or "mixtral" in name:
        return "mistral"
    if "gemma" in name:
        return "gemma"
    if "claude" in name:
        return "claude"
    if _OPENAI_NAME.search(name) or "gpt-3.5" in name or "gpt-4" in name:
        return "chatgpt"
    if "chatml" in name:
        return "chatml"
    return None


@register_chat_template_matching_function
def match_builtin_families(model_path: str) -> str | None:
    """Known families, judged by file name first so a folder name cannot override it."""
    path = model_path.strip().rstrip("/\\").lower()
    base = os.path.basename(path.replace("\\", "/"))
    return _match_name(base) or _match_name(path)
