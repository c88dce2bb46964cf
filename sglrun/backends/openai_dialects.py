"""The OpenAI API as each server speaks it: constraints, prefills and ``select``.

The OpenAI API has no regex and no way to continue a prefilled answer; servers that speak it
add their own parameters. A ``Dialect`` says what one server takes:

==========  =====================  ===================  ==============================
dialect     regex / dtype          json_schema          select on a chat model
==========  =====================  ===================  ==============================
llamacpp    ``grammar`` (GBNF)     ``json_schema``      logprobs of each choice's tokens
vllm        ``guided_regex``       ``guided_json``      ``guided_choice``
none        unsupported            chat only            generation + matching
==========  =====================  ===================  ==============================

(``json_schema`` always goes as ``response_format`` on chat models.) Also here: the GBNF
literals llama.cpp's grammars use, and reading OpenAI-style answers (logprobs, prefills).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sglrun.errors import UnsupportedCapabilityError
from sglrun.lang.global_config import global_config
from sglrun.lang.ir import SamplingParams

__all__ = [
    "DIALECTS",
    "Dialect",
    "PrefillStripper",
    "choices_gbnf",
    "literal_gbnf",
    "openai_logprobs",
    "regex_to_gbnf",
    "strip_prefill",
    "token_gbnf",
]

Warn = Callable[[str, str], None]


class Dialect:
    """What a plain OpenAI-compatible server takes (``none``): no grammar, no prefill."""

    name = "none"
    scoring = "echo"  # how select scores choices on a completion model
    choice_constraint = False  # select can be constrained to the choices
    capabilities = frozenset({"json_schema_chat", "logprobs", "n", "select", "stream", "images"})

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def hint(self, capability: str) -> str:
        """Why this server lacks ``capability``, and what would do it."""
        hints = {
            "regex": "this server has no regex/grammar parameter; use llama.cpp, vLLM or "
            "SGLang (RuntimeEndpoint)",
            "stop_regex": "OpenAI-compatible servers take plain stops",
            "stop_token_ids": "only vLLM takes stop token ids",
            "prefill": "gen must come right after sgl.assistant on this server",
            "json_schema": "completion models here take no schema; use a chat model",
        }
        return f"{hints.get(capability, 'the server has no such parameter')} " + (
            f"(server dialect: {self.name})"
        )

    def unsupported(self, capability: str, hint: str) -> UnsupportedCapabilityError:
        return UnsupportedCapabilityError(
            capability, "OpenAI", f"{hint} (server dialect: {self.name})"
        )

    def sampling(self, params: SamplingParams, body: dict[str, Any], warn: Warn) -> None:
        """The sampling parameters the plain API lacks: warned about, not sent."""
        for key, default in (("top_k", -1), ("min_p", 0.0)):
            value = getattr(params, key)
            if value is not None and value != default and not (key == "top_k" and value <= 0):
                warn(key, f"{key}={value} is ignored: the server has no {key}")
        if params.ignore_eos:
            warn("ignore_eos", "ignore_eos is ignored by this server")
        if params.min_new_tokens:
            warn("min_new_tokens", "min_new_tokens is ignored by this server")
        if params.stop_token_ids:
            raise self.unsupported("stop_token_ids", "only vLLM takes stop token ids")

    def regex(self, pattern: str) -> dict[str, Any]:
        raise self.unsupported(
            "regex",
            "this server has no regex/grammar parameter; use llama.cpp, vLLM or SGLang "
            "(RuntimeEndpoint)",
        )

    def completion_schema(self, schema: Any) -> dict[str, Any]:
        raise self.unsupported(
            "json_schema", "completion models here take no schema; use a chat model"
        )

    def prefill(self, body: dict[str, Any]) -> None:
        """An assistant turn that already has text, to be continued by the model."""
        raise self.unsupported(
            "assistant prefill", "gen must come right after sgl.assistant on this server"
        )

    def choices(self, choices: Sequence[str]) -> dict[str, Any]:
        return {}


class LlamaCppDialect(Dialect):
    """llama.cpp's server: GBNF grammars, JSON schemas, prefills, its own sampling defaults
    (top_k 40, min_p 0.05) overridden with SGLang's."""

    name = "llamacpp"
    scoring = "tokens"
    choice_constraint = True
    capabilities = Dialect.capabilities | {"regex", "json_schema", "ignore_eos", "prefill"}

    def sampling(self, params: SamplingParams, body: dict[str, Any], warn: Warn) -> None:
        body["top_k"] = max(params.top_k or 0, 0)
        body["min_p"] = params.min_p or 0.0
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.min_new_tokens:
            warn("min_new_tokens", "min_new_tokens is ignored by this server")
        if params.stop_token_ids:
            raise self.unsupported("stop_token_ids", "only vLLM takes stop token ids")

    def regex(self, pattern: str) -> dict[str, Any]:
        return {"grammar": regex_to_gbnf(pattern)}

    def completion_schema(self, schema: Any) -> dict[str, Any]:
        from sglrun.backends.grammar import strict_json_schema

        strict = global_config.strict_json_schema
        return {"json_schema": strict_json_schema(schema) if strict else schema}

    def prefill(self, body: dict[str, Any]) -> None:
        """llama.cpp continues a final assistant message by itself."""

    def choices(self, choices: Sequence[str]) -> dict[str, Any]:
        return {"grammar": choices_gbnf(choices)}


class VllmDialect(Dialect):
    """vLLM: guided decoding, stop token ids, min tokens, prefills by
    ``continue_final_message``."""

    name = "vllm"
    choice_constraint = True
    capabilities = Dialect.capabilities | {
        "regex", "json_schema", "ignore_eos", "prefill", "stop_token_ids", "min_tokens",
    }  # fmt: skip

    def sampling(self, params: SamplingParams, body: dict[str, Any], warn: Warn) -> None:
        body["top_k"] = params.top_k if params.top_k is not None else -1
        body["min_p"] = params.min_p or 0.0
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)

    def regex(self, pattern: str) -> dict[str, Any]:
        return {"guided_regex": pattern}

    def completion_schema(self, schema: Any) -> dict[str, Any]:
        return {"guided_json": schema}

    def prefill(self, body: dict[str, Any]) -> None:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False

    def choices(self, choices: Sequence[str]) -> dict[str, Any]:
        return {"guided_choice": list(choices)}


DIALECTS: dict[str, Dialect] = {
    dialect.name: dialect for dialect in (LlamaCppDialect(), VllmDialect(), Dialect())
}


# ---------------------------------------------------------------- GBNF literals
def _gbnf_char(ch: str, in_class: bool) -> str:
    code = ord(ch)
    specials = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
    if ch in specials:
        return specials[ch]
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if in_class and ch in "]^-[":
        return f"\\x{code:02X}"
    if not in_class and ch == '"':
        return '\\"'
    return ch


def literal_gbnf(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_gbnf_char(c, False) for c in text) + '"'


def choices_gbnf(choices: Sequence[str]) -> str:
    """A grammar whose only sentences are the ``choices``: ``root ::= "A" | "B"``."""
    alternatives = [literal_gbnf(c) for c in choices if c] or ['""']
    return "root ::= " + " | ".join(alternatives)


def token_gbnf(token_ids: Sequence[int]) -> str:
    """A grammar forcing exactly these token ids (llama.cpp's ``<[id]>`` syntax)."""
    if not token_ids:
        return 'root ::= ""'
    return "root ::= " + " ".join(f"<[{int(t)}]>" for t in token_ids)


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar (``root ::= ...``) accepting what ``pattern`` fully matches; raises
    ``UnsupportedCapabilityError`` naming this backend for what a grammar cannot express."""
    from sglrun.backends.grammar import regex_to_gbnf as convert

    try:
        return convert(pattern)
    except UnsupportedCapabilityError as exc:  # name this backend, keep the converter's reason
        text = str(exc)
        hint = text.split(": ", 1)[1] if ": " in text else text
        raise UnsupportedCapabilityError(exc.capability, "OpenAI", hint) from None


# ------------------------------------------------------- reading OpenAI answers
def openai_logprobs(data: Any) -> dict[str, Any]:
    """OpenAI logprobs (chat ``content`` list or legacy completion arrays) as SGLang's
    ``output_token_logprobs`` [(logprob, token_id, text)] and ``output_top_logprobs``."""
    if not isinstance(data, dict):
        return {}
    out: list[list[Any]] = []
    top: list[list[list[Any]]] = []
    if isinstance(data.get("content"), list):
        for entry in data["content"]:
            out.append([entry.get("logprob"), entry.get("id"), entry.get("token")])
            top.append(
                [
                    [t.get("logprob"), t.get("id"), t.get("token")]
                    for t in entry.get("top_logprobs") or []
                ]
            )
    else:
        for token, value in zip(data.get("tokens", []), data.get("token_logprobs", [])):
            out.append([value, None, token])
        for entry in data.get("top_logprobs") or []:
            top.append([[v, None, k] for k, v in (entry or {}).items()])
    return {"output_token_logprobs": out, "output_top_logprobs": top}


def strip_prefill(text: str, prefill: str) -> str:
    """Servers that continue an assistant prefill (llama.cpp) repeat it in the answer."""
    if prefill and text.startswith(prefill):
        return text[len(prefill) :]
    return text


class PrefillStripper:
    """Streaming version of ``strip_prefill``: holds text back until it can tell whether the
    answer repeats the prefill."""

    def __init__(self, prefill: str) -> None:
        self.prefill = prefill
        self.pending = ""
        self.decided = not prefill

    def feed(self, piece: str) -> str:
        if self.decided:
            return piece
        self.pending += piece
        if self.pending.startswith(self.prefill):
            self.decided = True
            return self.pending[len(self.prefill) :]
        if self.prefill.startswith(self.pending):
            return ""
        self.decided = True
        return self.pending

    def finish(self) -> str:
        if self.decided:
            return ""
        self.decided = True
        return self.pending
