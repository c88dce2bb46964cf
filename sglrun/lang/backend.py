"""The one small interface every backend implements.

A backend turns a ``GenerateRequest`` (the prompt so far plus resolved sampling parameters) into a
``GenerateResult``, and a ``SelectRequest`` into a ``ChoicesDecision``. Everything else
(variables, roles, forks, streaming to the caller) is the interpreter's job. Backends must be
thread-safe: many program states call them at once.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

from sglrun.errors import UnsupportedCapabilityError
from sglrun.lang.ir import SamplingParams

if TYPE_CHECKING:
    from sglrun.lang.chat_template import ChatTemplate
    from sglrun.lang.choices import ChoicesDecision, ChoicesSamplingMethod

__all__ = [
    "CAPABILITIES",
    "INCREMENTAL_META_KEYS",
    "Backend",
    "ChunkCallback",
    "GenerateRequest",
    "GenerateResult",
    "ImageData",
    "SelectRequest",
]


class ChunkCallback(Protocol):
    """Receives each new piece of generated text while a request streams, with the meta info
    known so far when the backend has it: ``completion_tokens`` so far and, for
    ``INCREMENTAL_META_KEYS``, only the entries of the tokens new since the last piece."""

    def __call__(self, piece: str, meta: dict[str, Any] | None = None) -> None: ...


INCREMENTAL_META_KEYS = ("output_token_logprobs", "output_top_logprobs")
"""Meta keys a streamed piece carries for its own tokens only (as SGLang's streams do)."""


@dataclasses.dataclass(slots=True, frozen=True)
class ImageData:
    """An image appended with ``sgl.image``: where it came from and its base64 bytes."""

    source: str
    base64_data: str
    mime_type: str = "image/jpeg"

    @property
    def data_url(self) -> str:
        return f"data:{self.mime_type};base64,{self.base64_data}"


CAPABILITIES: tuple[str, ...] = (
    "regex",  # regex, dtype and gen_int/gen_string constraints
    "json_schema",
    "images",
    "logprobs",  # return_logprob and top logprobs
    "n",  # several samples per gen
    "stop_regex",
    "stop_token_ids",
    "select",
    "prefill",  # a gen after text inside an assistant turn (chat APIs)
)
"""What a program can need that not every backend can do (``Backend.supports``)."""


@dataclasses.dataclass(slots=True)
class GenerateRequest:
    """One generation. ``prompt`` is the whole text so far (completion-style backends);
    ``messages`` are the finished chat turns in OpenAI format, ``role`` the open role (or None)
    and ``role_text`` the text inside it so far (chat-style backends)."""

    prompt: str
    params: SamplingParams
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    role: str | None = None
    role_text: str = ""
    images: list[ImageData] = dataclasses.field(default_factory=list)
    name: str | None = None  # the variable the result goes to (for logs and test doubles)

    def needs(self) -> list[str]:
        """The capabilities (``CAPABILITIES``) this request needs of a backend."""
        p = self.params
        found = []
        if p.regex is not None or p.dtype is not None:
            found.append("regex")
        if p.json_schema is not None:
            found.append("json_schema")
        if self.images:
            found.append("images")
        if p.return_logprob:
            found.append("logprobs")
        if (p.n or 1) > 1:
            found.append("n")
        if p.stop_regex:
            found.append("stop_regex")
        if p.stop_token_ids:
            found.append("stop_token_ids")
        if self.role == "assistant" and self.role_text.strip():
            found.append("prefill")
        return found


@dataclasses.dataclass(slots=True)
class GenerateResult:
    """The generated text (a list when ``n > 1``) and SGLang-style meta info:
    ``prompt_tokens``, ``completion_tokens``, ``finish_reason`` ({"type": "stop"|"length",
    "matched": ...}), ``output_token_logprobs`` [(logprob, token_id, text|None), ...], ..."""

    text: str | list[str]
    meta_info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class SelectRequest:
    """Choose one of ``choices`` to follow the prompt, by ``choices_method``."""

    prompt: str
    choices: list[str]
    temperature: float
    choices_method: ChoicesSamplingMethod
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    role: str | None = None
    role_text: str = ""
    images: list[ImageData] = dataclasses.field(default_factory=list)
    name: str | None = None

    def needs(self) -> list[str]:
        """The capabilities this request needs of a backend."""
        return ["select", *(["images"] if self.images else [])]


class Backend:
    """Base class of all backends. Subclasses implement ``generate`` and ``select``."""

    #: Short name used in error messages ("embedded llama.cpp", "OpenAI", ...).
    name: str = "backend"
    #: True when the server only takes chat messages (the prompt text is not sent as-is).
    is_chat_model: bool = False
    #: True when calling it from a program on a hub (``sglrun.lang.hub``) never blocks the
    #: thread: all its waiting goes through the hub (HTTP backends). Other backends are
    #: called from the hub's worker threads.
    cooperative: bool = False
    #: What this backend can do, of ``CAPABILITIES`` (``supports`` may know better at run
    #: time, e.g. once it knows which server it talks to).
    capabilities: frozenset[str] = frozenset(CAPABILITIES)

    def supports(self, capability: str) -> bool:
        """Whether this backend can do ``capability`` (one of ``CAPABILITIES``). The
        interpreter asks before each request, and ``sglrun batch`` and ``inspect`` before the
        first one, so a program fails with one clear line instead of half-way."""
        return capability in self.capabilities

    def capability_hint(self, capability: str) -> str:
        """Why ``capability`` is missing, or what to use instead (for the error message)."""
        return ""

    def get_chat_template(self) -> ChatTemplate:
        from sglrun.lang.chat_template import get_chat_template

        return get_chat_template("default")

    def get_model_name(self) -> str:
        return self.name

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        """Generate text. With ``on_chunk`` the backend streams, calling it with each new
        piece of text, and still returns the whole result at the end."""
        raise NotImplementedError

    def select(self, request: SelectRequest) -> ChoicesDecision:
        raise UnsupportedCapabilityError("select", self.name)

    # Optional operations: harmless defaults so every backend can be driven the same way.
    def cache_prefix(self, prefix: str) -> None:
        """Warm the server's prefix cache with text shared by many programs."""

    def flush_cache(self, empty_cache: bool = True) -> bool:
        return False

    @property
    def model_info(self) -> dict[str, Any]:
        """SGLang's ``model_info`` (``/get_model_info``): the model and where its tokenizer is
        (for a GGUF file, the file itself)."""
        model = self.get_model_name()
        return {"model_path": model, "tokenizer_path": model, "is_generation": True}

    def get_server_info(self) -> dict[str, Any]:
        """What SGLang's server info holds that programs read (``model_path``,
        ``tokenizer_path``), and which backend this is."""
        return {"backend": self.name, "model": self.get_model_name(), **self.model_info}

    def cache_identity(self) -> dict[str, Any] | None:
        """What, besides the request, decides this backend's answers, for the call cache's
        keys: its kind and model (a ``pathlib.Path`` value stands for the file's content hash),
        and settings that change answers. Never a secret (API keys stay out). None: the
        answers cannot be cached (they depend on more than the request)."""
        kind = type(self)
        return {"backend": f"{kind.__module__}.{kind.__qualname__}", "model": self.get_model_name()}

    def concurrency_hint(self) -> int | None:
        """How many programs in flight keep this backend busy, when it can say (an engine's
        slots, a server's advertised limit); ``num_threads="auto"`` uses it. None: the
        scheduler's default."""
        return None

    def shutdown(self) -> None:
        """Release engines, threads and connections."""
