"""``sglang.srt.constrained.build_regex_from_object``: a regex for JSON under a schema.

SGLang's helper turns a pydantic model, a dict or a JSON-schema string into a regular
expression (for ``gen(regex=...)``) with outlines' schema compiler; so does this one, with
``outlines-core`` (``pip install 'sglrun[sglang]'``). The default whitespace between tokens is
theirs, ``[ ]?``. ``gen(json_schema=...)`` is the direct way and needs neither.
"""

from __future__ import annotations

import json
from typing import Any

from sglrun.errors import InvalidArgumentError

__all__ = ["build_regex_from_object"]

__path__: list[str] = []  # also stands for the package sglang.srt.constrained


def build_regex_from_object(obj: Any, whitespace_pattern: str | None = None) -> str:
    """A regex matching the JSON documents valid under ``obj``: a pydantic model class, a
    JSON schema as a dict, or one as a JSON string."""
    try:
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        raise InvalidArgumentError(
            "build_regex_from_object needs outlines-core: pip install 'sglrun[sglang]' "
            "(or use gen(json_schema=...), which needs nothing more)"
        ) from None
    if isinstance(obj, type) and hasattr(obj, "model_json_schema"):
        schema = json.dumps(obj.model_json_schema())
    elif isinstance(obj, dict):
        schema = json.dumps(obj)
    elif isinstance(obj, str):
        schema = obj
    else:
        raise InvalidArgumentError(
            "build_regex_from_object takes a pydantic model class, a dict or a JSON string, "
            f"not {type(obj).__name__}"
        )
    try:
        return str(build_regex_from_schema(schema, whitespace_pattern))
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"build_regex_from_object: {exc}") from None
