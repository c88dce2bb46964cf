"""``BaseBackend``: SGLang's backend contract, for backends written against SGLang.

An SGLang backend subclasses ``sglang.lang.backend.base_backend.BaseBackend`` and implements
``generate(s, sampling_params) -> (text, meta_info)`` (and ``generate_stream``, ``select``)
reading the program's text from ``s.text_`` (its ``StreamExecutor``). sglrun's own contract is
``sglrun.lang.backend.Backend`` (a request in, a result out). ``SglangBackendAdapter`` lets
one drive the other: ``global_config.resolve_backend`` wraps any ``BaseBackend`` in it, so a
custom SGLang backend runs unchanged under sglrun (``set_default_backend`` or ``backend=``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sglrun.lang.backend import Backend, ChunkCallback, GenerateRequest, GenerateResult
from sglrun.lang.choices import ChoicesDecision

if TYPE_CHECKING:
    from sglrun.lang.backend import SelectRequest
    from sglrun.lang.chat_template import ChatTemplate
    from sglrun.lang.choices import ChoicesSamplingMethod
    from sglrun.lang.ir import SamplingParams

__all__ = ["BaseBackend", "RequestExecutor", "SglangBackendAdapter"]


class RequestExecutor:
    """The ``s`` an SGLang backend reads: the attributes of a ``StreamExecutor`` a backend
    uses (``text_``, ``messages_``, ``cur_role``, ``images_``, ...), made from one request."""

    def __init__(self, request: GenerateRequest | SelectRequest, backend: BaseBackend) -> None:
        self.backend = backend
        self.text_ = request.prompt
        self.messages_ = list(request.messages)
        self.cur_role = request.role
        self.cur_role_text = request.role_text
        pairs = [(image.source, image.base64_data) for image in request.images]
        self.images_ = pairs
        self.cur_images = list(pairs)
        self.chat_template = backend.get_chat_template()
        self.sid = request.name or "gen"

    def text(self) -> str:
        return self.text_

    def messages(self) -> list[dict[str, Any]]:
        return self.messages_


class BaseBackend:
    """The base class SGLang backends subclass; override what your backend does."""

    def __init__(self) -> None:
        from sglrun.lang.chat_template import get_chat_template

        self.support_concate_and_append = False
        self.chat_template = get_chat_template("default")

    is_chat_model = False

    def get_model_name(self) -> str:
        raise NotImplementedError

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def cache_prefix(self, prefix_str: str) -> None:
        pass

    def uncache_prefix(self, rid: str) -> None:
        pass

    def end_request(self, rid: str | list[str]) -> None:
        pass

    def begin_program(self, s: Any) -> None:
        pass

    def end_program(self, s: Any) -> None:
        pass

    def commit_lazy_operations(self, s: Any) -> None:
        pass

    def fork_program(self, src: Any, dst: list[Any], position_ids_offset: Any = None) -> None:
        pass

    def fill_image(self, s: Any) -> None:
        pass

    def generate(self, s: Any, sampling_params: SamplingParams) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def generate_stream(
        self, s: Any, sampling_params: SamplingParams
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        raise NotImplementedError

    def select(
        self,
        s: Any,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        raise NotImplementedError

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def flush_cache(self) -> Any:
        pass

    def get_server_info(self) -> Any:
        pass


class SglangBackendAdapter(Backend):
    """An SGLang ``BaseBackend`` behind sglrun's ``Backend`` contract. Its calls block, so
    the scheduler runs them on worker threads."""

    def __init__(self, inner: BaseBackend) -> None:
        self.inner = inner
        self.name = type(inner).__name__
        self.is_chat_model = bool(getattr(inner, "is_chat_model", False))

    def get_chat_template(self) -> ChatTemplate:
        return self.inner.get_chat_template()

    def get_model_name(self) -> str:
        try:
            return str(self.inner.get_model_name())
        except NotImplementedError:
            return self.name

    def cache_identity(self) -> dict[str, Any]:
        """The wrapped backend's class and model: two SGLang backends never share answers."""
        kind = type(self.inner)
        return {"backend": f"{kind.__module__}.{kind.__qualname__}", "model": self.get_model_name()}

    def generate(
        self, request: GenerateRequest, on_chunk: ChunkCallback | None = None
    ) -> GenerateResult:
        s = RequestExecutor(request, self.inner)
        if on_chunk is not None:
            try:
                pieces = self.inner.generate_stream(s, request.params)
            except NotImplementedError:
                pieces = None
            if pieces is not None:
                text, meta = "", dict[str, Any]()
                for piece, meta in pieces:
                    text += piece
                    on_chunk(piece, meta)
                return GenerateResult(text, dict(meta or {}))
        text, meta = self.inner.generate(s, request.params)
        return GenerateResult(text, dict(meta or {}))

    def select(self, request: SelectRequest) -> ChoicesDecision:
        s = RequestExecutor(request, self.inner)
        decision = self.inner.select(
            s, list(request.choices), request.temperature, request.choices_method
        )
        if not isinstance(decision, ChoicesDecision):  # older backends return (choice, meta)
            choice, meta = decision
            decision = ChoicesDecision(choice, meta)
        return decision

    def cache_prefix(self, prefix: str) -> None:
        self.inner.cache_prefix(prefix)

    def flush_cache(self, empty_cache: bool = True) -> bool:
        flushed: Any = self.inner.flush_cache()  # SGLang's answer None: nothing to report
        return bool(flushed)

    def get_server_info(self) -> dict[str, Any]:
        info = self.inner.get_server_info()
        return dict(info) if isinstance(info, dict) else super().get_server_info()

    def shutdown(self) -> None:
        self.inner.shutdown()
