"""Row values to program arguments, by the parameters' type annotations.

A CSV cell is always a string; a JSONL value may be anything. ``convert_row`` turns a row into
keyword arguments for a program: ``int``, ``float``, ``bool``, ``list``/``dict`` (as JSON),
``Literal``, ``Optional`` and unions; an empty cell for a parameter with a default keeps it.
Every mismatch is an ``InputError`` naming the column and what was expected.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sglrun.batch.readers import _parse_json_line
from sglrun.errors import InputError, InvalidArgumentError

__all__ = ["ParamSpec", "convert_row", "param_specs", "takes_rest"]


@dataclass(frozen=True)
class ParamSpec:
    """One keyword parameter of a program function (the state parameter ``s`` excluded)."""

    name: str
    annotation: Any = None
    has_default: bool = False
    default: Any = None


def takes_rest(func: Callable[..., Any]) -> bool:
    """Whether ``func`` has a ``**kwargs`` parameter: then a row's other columns go there."""
    parameters = inspect.signature(func).parameters.values()
    return any(param.kind is param.VAR_KEYWORD for param in parameters)


def param_specs(func: Callable[..., Any]) -> list[ParamSpec]:
    """The parameters a row can fill: every parameter after the first (the state ``s``)."""
    signature = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an unresolvable forward reference: fall back per parameter below
        hints = {}
    params = list(signature.parameters.values())
    if not params:
        raise InvalidArgumentError(f"{getattr(func, '__name__', func)!r} has no state parameter")
    specs = []
    for param in params[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(param.name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = None
        elif isinstance(annotation, str):  # evaluate it as get_type_hints would; unknown = None
            try:
                annotation = eval(annotation, dict(getattr(func, "__globals__", {})))
            except Exception:
                annotation = None
        has_default = param.default is not inspect.Parameter.empty
        default = param.default if has_default else None
        specs.append(ParamSpec(param.name, annotation, has_default, default))
    return specs


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class _Mismatch(Exception):
    """The value does not fit the annotation."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if origin is not None:
        return getattr(origin, "__name__", str(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation``; raises _Mismatch when it cannot be."""
    if annotation is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, typing.get_args(annotation))
    if origin is typing.Literal:
        for choice in typing.get_args(annotation):
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise _Mismatch
    target = origin or annotation
    if annotation is type(None):
        if value is None or value == "":
            return None
        raise _Mismatch
    if target is bool:
        return _to_bool(value)
    if target is int:
        return _to_int(value)
    if target is float:
        return _to_float(value)
    if target is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if target in (list, dict, tuple):
        if isinstance(value, str):
            value, why = _parse_json_line(value)
            if why:
                raise _Mismatch
        if target is tuple and isinstance(value, list):
            return tuple(value)
        if isinstance(value, target):
            return value
        raise _Mismatch
    if isinstance(target, type) and not isinstance(value, target):
        raise _Mismatch
    return value


def _convert_union(value: Any, members: tuple[Any, ...]) -> Any:
    if type(None) in members and (value is None or value == ""):
        return None
    for member in members:  # a value already of a member type stays as it is
        if isinstance(member, type) and member is not type(None) and type(value) is member:
            return value
    for member in members:
        if member is type(None):
            continue
        try:
            return _convert(value, member)
        except _Mismatch:
            continue
    raise _Mismatch


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise _Mismatch


def _to_int(value: Any) -> int:
    if type(value) is int:
        return value
    number = _to_float(value)  # "3.0" from a spreadsheet export is still 3
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if number.is_integer():
        return int(number)
    raise _Mismatch


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise _Mismatch from None


def _shorten(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_columns(
    columns: Iterable[str],
    params: list[ParamSpec],
    *,
    mapping: dict[str, str] | None = None,
    strict: bool = False,
    source: str = "",
    id_field: str | None = None,
    rest: bool = False,
) -> None:
    """What a row's keys alone decide: every required parameter has its column, and with
    ``strict`` no column is left over (``rest``: the program's ``**kwargs`` takes them). A CSV
    header decides it for every row at once."""
    prefix = f"{source}: " if source else ""
    by_name = {spec.name: spec for spec in params}
    mapping = dict(mapping or {})
    for param in mapping:
        if param not in by_name:
            known = ", ".join(by_name) or "none"
            raise InvalidArgumentError(f"--map names {param!r}, which is not a parameter ({known})")
    present = set(columns)
    missing = []
    for spec in params:
        column = mapping.get(spec.name, spec.name)
        if column not in present and not spec.has_default:
            via = "" if column == spec.name else f" (column {column!r})"
            missing.append(spec.name + via)
    if missing:
        raise InputError(f"{prefix}missing required argument(s): {', '.join(missing)}")
    if strict and not rest:
        known_columns = set(mapping.values()) | {n for n in by_name if n not in mapping}
        if id_field is not None:
            known_columns.add(id_field)
        unknown = [column for column in columns if column not in known_columns]
        if unknown:
            names = ", ".join(repr(column) for column in unknown)
            raise InputError(
                f"{prefix}unknown column(s) {names}; parameters are {', '.join(by_name) or 'none'}"
            )


def convert_row(
    data: dict[str, Any],
    params: list[ParamSpec],
    *,
    mapping: dict[str, str] | None = None,
    strict: bool = False,
    source: str = "",
    id_field: str | None = None,
    rest: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for one row; raises InputError naming the column and the problem.

    ``mapping`` is ``{parameter: column}``; ``source`` (e.g. ``"in.csv:7"``) prefixes messages.
    An empty CSV cell for a non-string parameter with a default means "use the default".
    ``rest`` (a program with ``**kwargs``): the columns no parameter takes go along as they are.
    """
    check_columns(
        data, params, mapping=mapping, strict=strict, source=source, id_field=id_field, rest=rest
    )
    mapping = dict(mapping or {})
    kwargs: dict[str, Any] = {}
    if rest:
        taken: set[str | None] = {mapping.get(spec.name, spec.name) for spec in params}
        taken.update(spec.name for spec in params)
        taken.add(id_field)
        kwargs.update((key, value) for key, value in data.items() if key not in taken)
    for spec in params:
        column = mapping.get(spec.name, spec.name)
        if column not in data:
            continue
        value = data[column]
        if _use_default(value, spec):
            continue
        try:
            kwargs[spec.name] = _convert(value, spec.annotation)
        except _Mismatch:
            raise InputError(
                f"{source + ': ' if source else ''}column {column!r}: expected "
                f"{_type_name(spec.annotation)}, got {_shorten(value)}"
            ) from None
    return kwargs


def _use_default(value: Any, spec: ParamSpec) -> bool:
    """An empty cell or null that the annotation cannot hold means "not given": keep the default."""
    if not spec.has_default or (value is not None and value != ""):
        return False
    try:
        _convert(value, spec.annotation)
    except _Mismatch:
        return True
    return False
