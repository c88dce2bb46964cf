"""Turning model output and program inputs into values: typed gens, reasoning split off an
answer, images from paths, bytes, data URLs or base64."""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

from sglrun.errors import InvalidArgumentError, ProgramError
from sglrun.lang.backend import ImageData

__all__ = ["check_json", "cut_note", "load_image", "parse_dtype", "split_reasoning"]


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def split_reasoning(text: str, model_type: str | None) -> tuple[str, str]:
    """Split ``<think>...</think>`` reasoning from the answer (DeepSeek-R1 may omit the
    opening tag: then everything before ``</think>`` is reasoning)."""
    match = _THINK.search(text)
    if match:
        answer = (text[: match.start()] + text[match.end() :]).strip()
        return match.group(1).strip(), answer
    if "</think>" in text:
        reasoning, _, answer = text.partition("</think>")
        return reasoning.replace("<think>", "").strip(), answer.strip()
    return "", text


def parse_dtype(text: str, dtype: str | None, name: str | None) -> Any:
    """A typed gen's text as its Python value (``dtype`` int, float, bool or str)."""
    if dtype is None or dtype == "str":
        if dtype == "str":
            stripped = text.strip()
            if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
                return stripped[1:-1]
        return text
    stripped = text.strip()
    try:
        if dtype == "int":
            return int(stripped)
        if dtype == "float":
            return float(stripped)
        if dtype == "bool":
            if stripped in ("True", "False"):
                return stripped == "True"
            raise ValueError(stripped)
    except ValueError:
        raise ProgramError(
            f"gen {name!r} with dtype {dtype} produced {text[:40]!r}, which is not a {dtype}"
        ) from None
    return text


def cut_note(meta: dict[str, Any]) -> str:
    """``" (cut by max_tokens after N tokens)"`` when the meta info says it was cut."""
    finish = meta.get("finish_reason")
    if isinstance(finish, dict) and finish.get("type") == "length":
        tokens = meta.get("completion_tokens")
        return f" (cut by max_tokens after {tokens} tokens: raise max_tokens)"
    return ""


def check_json(text: str | list[str], name: str | None, meta: dict[str, Any]) -> None:
    """A ``json_schema`` gen's text must be one JSON document; else an error naming the
    variable (and saying when ``max_tokens`` cut it), never a silently broken string."""
    for item in text if isinstance(text, list) else [text]:
        try:
            json.loads(item)
        except ValueError:
            raise ProgramError(
                f"gen {name!r} with json_schema produced text that is not valid JSON"
                f"{cut_note(meta)}: {item[:60]!r}"
            ) from None


def load_image(source: Any) -> ImageData:
    """Accept a path, raw bytes, a data URL or base64 text, as SGLang's image() does."""
    if isinstance(source, bytes):
        return ImageData("<bytes>", base64.b64encode(source).decode())
    text = str(source)
    if text.startswith("data:"):
        header, _, data = text.partition(",")
        mime = header[5:].split(";")[0] or "image/jpeg"
        return ImageData("<data-url>", data, mime)
    if os.path.exists(text):
        with open(text, "rb") as handle:
            data = base64.b64encode(handle.read()).decode()
        ext = os.path.splitext(text)[1].lower().lstrip(".")
        mime = {"png": "image/png", "gif": "image/gif", "webp": "image/webp"}.get(ext, "image/jpeg")
        return ImageData(text, data, mime)
    if len(text) > 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", text):
        return ImageData("<base64>", text)
    raise InvalidArgumentError(f"image {text[:60]!r} is not a file, data URL or base64 data")
