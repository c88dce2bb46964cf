"""``sgl.Runtime`` and ``sgl.Engine``: SGLang's ways to start a model, on the embedded engine.

SGLang programs start a local model with ``sgl.Runtime(model_path=...)`` (a server process,
used as a backend: ``set_default_backend(runtime)``, then ``runtime.shutdown()``) or drive one
directly with ``sgl.Engine(model_path=...).generate(prompts, sampling_params)``. Here both run
the embedded llama.cpp engine on a GGUF file, in this process. A Hugging Face model id needs
SGLang's own server, and gets one line saying so. Arguments of SGLang's ``ServerArgs`` that
mean nothing to llama.cpp (``tp_size``, ``mem_fraction_static``, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sglrun.errors import InvalidArgumentError
from sglrun.lang.backend import GenerateRequest
from sglrun.lang.ir import SamplingParams, normalize_sampling
from sglrun.lang.sampling import check_sampling

if TYPE_CHECKING:
    from sglrun.backends.llamacpp import LlamaCpp

__all__ = ["Engine", "Runtime"]

_ENGINE_ARGS = {"n_parallel", "n_ctx", "n_threads", "chat_template_name", "reproducible"}
_SRT_TO_ENGINE = {"max_running_requests": "n_parallel", "context_length": "n_ctx"}
_TOP_LEVEL = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


def _start_engine(model_path: Any, kwargs: dict[str, Any], who: str) -> LlamaCpp:
    from sglrun.backends.llamacpp import LlamaCpp

    if model_path is None:
        raise InvalidArgumentError(f"{who} needs model_path=, a GGUF file")
    path = str(model_path)
    if not path.endswith(".gguf") and not Path(path).exists():
        raise InvalidArgumentError(
            f"{who}(model_path={path!r}): sglrun's embedded engine runs GGUF files; for a "
            "Hugging Face model start SGLang's server (python -m sglang.launch_server "
            f"--model-path {path}) and use sgl.RuntimeEndpoint(its URL)"
        )
    options = {_SRT_TO_ENGINE.get(key, key): value for key, value in kwargs.items()}
    chat_template = options.pop("chat_template", None)
    if chat_template is not None:
        options["chat_template_name"] = chat_template
    return LlamaCpp(os.fspath(path), **{k: v for k, v in options.items() if k in _ENGINE_ARGS})


def _request(prompt: Any, sampling_params: dict[str, Any] | None, extra: dict[str, Any]) -> Any:
    """A ``GenerateRequest`` from SGLang's ``/generate`` spelling of sampling parameters."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt must be a str, not {type(prompt).__name__}")
    values = dict(sampling_params or {})
    values.update({key: value for key, value in extra.items() if value is not None})
    unknown = sorted(set(values) - set(SamplingParams.__dataclass_fields__) - {"max_tokens"})
    if unknown:
        raise InvalidArgumentError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    values = normalize_sampling(values)
    check_sampling("generate", values)
    return GenerateRequest(prompt=prompt, params=SamplingParams.defaults(**values))


class Engine:
    """``sgl.Engine(model_path="model.gguf")``: generate without a program."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        kwargs.pop("log_level", None)
        who = kwargs.pop("_who", "sgl.Engine")
        self.backend = _start_engine(model_path, kwargs, who)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        stream: bool = False,
        **ignored: Any,
    ) -> Any:
        """As SGLang's: ``{"text", "meta_info"}`` for one prompt, a list of them for a list
        (``sampling_params`` one dict for all or one per prompt); ``stream=True`` yields
        dicts whose ``text`` grows."""
        extra = {
            "return_logprob": return_logprob or None,
            "logprob_start_len": logprob_start_len,
            "top_logprobs_num": top_logprobs_num,
        }
        if isinstance(prompt, list):
            if stream:
                raise InvalidArgumentError("stream=True takes one prompt")
            params = sampling_params if isinstance(sampling_params, list) else None
            if params is not None and len(params) != len(prompt):
                raise InvalidArgumentError("one sampling_params per prompt, or one for all")
            return [
                self._one(text, params[i] if params else sampling_params, extra)  # type: ignore[arg-type]
                for i, text in enumerate(prompt)
            ]
        if isinstance(sampling_params, list):
            raise InvalidArgumentError("a list of sampling_params needs a list of prompts")
        if stream:
            return self._stream(prompt, sampling_params, extra)
        return self._one(prompt, sampling_params, extra)

    def _one(self, prompt: Any, params: dict[str, Any] | None, extra: dict[str, Any]) -> Any:
        result = self.backend.generate(_request(prompt, params, extra))
        return {"text": result.text, "meta_info": result.meta_info}

    def _stream(self, prompt: Any, params: dict[str, Any] | None, extra: dict[str, Any]) -> Any:
        import queue
        import threading

        pieces: queue.Queue[Any] = queue.Queue()
        done = object()

        def work() -> None:
            try:
                result = self.backend.generate(
                    _request(prompt, params, extra),
                    on_chunk=lambda piece, meta=None: pieces.put((piece, meta)),
                )
                pieces.put((done, result))
            except BaseException as exc:  # handed to the reader
                pieces.put((done, exc))

        threading.Thread(target=work, name="sglrun-engine-stream", daemon=True).start()
        text = ""
        while True:
            piece, meta = pieces.get()
            if piece is done:
                if isinstance(meta, BaseException):
                    raise meta
                yield {"text": meta.text, "meta_info": meta.meta_info}
                return
            text += piece
            yield {"text": text, "meta_info": dict(meta or {})}

    def get_server_info(self) -> dict[str, Any]:
        return self.backend.get_server_info()

    def flush_cache(self) -> bool:
        return self.backend.flush_cache()

    def shutdown(self) -> None:
        self.backend.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class Runtime:
    """``sgl.Runtime(model_path="model.gguf")``: a local model to use as a backend
    (``set_default_backend(runtime)``; its ``endpoint`` is the embedded engine)."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        for key in ("log_level", "launch_timeout", "port", "host"):
            kwargs.pop(key, None)
        self._engine = Engine(model_path, _who="sgl.Runtime", **kwargs)
        self.endpoint = self._engine.backend

    def generate(
        self,
        prompt: str | list[str],
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        **ignored: Any,
    ) -> str:
        """As SGLang's: the ``/generate`` answer as a JSON string."""
        answer = self._engine.generate(
            prompt,
            sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
        )
        return json.dumps(answer)

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def get_tokenizer(self) -> Any:
        raise InvalidArgumentError(
            "sgl.Runtime on a GGUF file has no Hugging Face tokenizer; "
            "use runtime.endpoint.tokenize(text) for its token ids"
        )

    def shutdown(self) -> None:
        self.endpoint.shutdown()
