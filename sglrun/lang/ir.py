"""The intermediate representation: the expressions a program appends to its state.

Each node names its ``kind``; the interpreter has one method per kind (``visit_<kind>``), so a
new node type without a rule fails with ``UnsupportedNodeError`` instead of falling through.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from sglrun.lang.choices import ChoicesSamplingMethod

__all__ = [
    "REGEX_BOOL",
    "REGEX_FLOAT",
    "REGEX_INT",
    "REGEX_STR",
    "SamplingParams",
    "resolve_sampling",
    "SglArgument",
    "SglSamplingParams",
    "SglCommitLazy",
    "SglConcateAndAppend",
    "SglConstantText",
    "SglExpr",
    "SglExprList",
    "SglGen",
    "SglImage",
    "SglRoleBegin",
    "SglRoleEnd",
    "SglSelect",
    "SglSeparateReasoning",
    "SglVarScopeBegin",
    "SglVarScopeEnd",
    "SglVariable",
    "SglVideo",
]

# The same patterns SGLang uses for typed generation.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

SAMPLING_FIELDS: tuple[str, ...] = (
    "max_new_tokens",
    "min_new_tokens",
    "n",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
    "dtype",
    "regex",
    "json_schema",
)


@dataclasses.dataclass(slots=True)
class SamplingParams:
    """Sampling parameters. In a ``gen`` every field is an override (None = not set); after
    ``resolved`` they are the values a backend must honour."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    n: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop_regex: tuple[str, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: str | None = None  # "int" | "float" | "bool" | "str"
    regex: str | None = None
    json_schema: str | None = None

    @classmethod
    def defaults(cls, **values: Any) -> SamplingParams:
        """The run-level defaults, as SGLang's ``run`` sets them, overridden by ``values``."""
        base = cls(
            max_new_tokens=128,
            min_new_tokens=0,
            n=1,
            stop=(),
            stop_token_ids=(),
            stop_regex=(),
            temperature=1.0,
            top_p=1.0,
            top_k=-1,
            min_p=0.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
            ignore_eos=False,
        )
        return base.overridden_by(cls(**normalize_sampling(values)))

    def overridden_by(self, other: SamplingParams) -> SamplingParams:
        """A copy of self with every field that ``other`` sets replaced."""
        # Positional construction from two tuples: this runs for every gen of every program.
        return SamplingParams(
            *[a if b is None else b for a, b in zip(_all_fields(self), _all_fields(other))]
        )

    def with_extra_stop(self, extra: Sequence[str]) -> SamplingParams:
        current = tuple(self.stop or ())
        added = tuple(s for s in extra if s not in current)
        if not added:
            return self
        merged = SamplingParams(*_all_fields(self))
        merged.stop = current + added
        return merged


RESOLVED_LIMIT = 4096
_RESOLVED: dict[tuple[int, int, int], tuple[Any, Any, Any, SamplingParams]] = {}


def resolve_sampling(
    defaults: SamplingParams, overrides: SamplingParams, extra_stop: Sequence[str]
) -> SamplingParams:
    """``defaults.overridden_by(overrides).with_extra_stop(extra_stop)``, kept per the three
    objects: a batch resolves the same gen's parameters against the same defaults once per
    row. The entry holds all three, so their ids stay theirs while it lives."""
    key = (id(defaults), id(overrides), id(extra_stop))
    hit = _RESOLVED.get(key)
    if hit is not None and hit[0] is defaults and hit[1] is overrides and hit[2] is extra_stop:
        return hit[3]
    params = defaults.overridden_by(overrides).with_extra_stop(extra_stop)
    if len(_RESOLVED) >= RESOLVED_LIMIT:
        _RESOLVED.clear()
    _RESOLVED[key] = (defaults, overrides, extra_stop, params)
    return params


_all_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(SamplingParams)))
assert tuple(f.name for f in dataclasses.fields(SamplingParams)) == SAMPLING_FIELDS


def _as_tuple(value: Any) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return (value,)
    return tuple(value)


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty")


def normalize_sampling(values: dict[str, Any]) -> dict[str, Any]:
    """Map SGLang's spellings (``max_tokens``, a str stop, a dtype type) to field names."""
    out = dict(values)
    if "max_tokens" in out:
        out["max_new_tokens"] = out.pop("max_tokens")
    if "min_tokens" in out:
        out["min_new_tokens"] = out.pop("min_tokens")
    for key in ("stop", "stop_token_ids", "stop_regex"):
        if key in out:
            out[key] = _as_tuple(out[key])
    for key in _FLOAT_FIELDS:  # temperature=0 and 0.0 are one request (and one cache key)
        if type(out.get(key)) is int:
            out[key] = float(out[key])
    if out.get("dtype") is not None:
        out["dtype"] = dtype_name(out["dtype"])
    return out


def dtype_name(dtype: Any) -> str:
    names = {int: "int", float: "float", bool: "bool", str: "str"}
    if dtype in names:
        return names[dtype]
    if isinstance(dtype, str) and dtype in {"int", "float", "bool", "str", "string"}:
        return "str" if dtype == "string" else dtype
    from sglrun.errors import InvalidArgumentError

    raise InvalidArgumentError(f"dtype must be int, float, bool or str, not {dtype!r}")


class SglExpr:
    """Base of every expression; ``a + b`` builds an ``SglExprList``. ``prev_node`` links
    the nodes a trace appended (``trace().last_node.print_graph_dfs()``)."""

    __slots__ = ("prev_node",)
    kind: ClassVar[str] = "expr"
    prev_node: SglExpr | None

    def print_graph_dfs(self) -> str:
        """The chain of traced nodes ending here, one per line, first first."""
        chain: list[SglExpr] = []
        node: SglExpr | None = self
        while node is not None and len(chain) < 100_000:
            chain.append(node)
            node = getattr(node, "prev_node", None)
        lines = [f"%{i} = {node!r}" for i, node in enumerate(reversed(chain))]
        return "\n".join(lines)

    def __add__(self, other: SglExpr | str) -> SglExprList:
        return SglExprList(_flatten(self) + _flatten(_as_expr(other)))

    def __radd__(self, other: SglExpr | str) -> SglExprList:
        return SglExprList(_flatten(_as_expr(other)) + _flatten(self))


def _as_expr(value: SglExpr | str) -> SglExpr:
    if isinstance(value, SglExpr):
        return value
    if isinstance(value, str):
        return SglConstantText(value)
    from sglrun.errors import InvalidArgumentError

    raise InvalidArgumentError(
        f"cannot append {type(value).__name__} to a program; use str() or an sglrun primitive"
    )


def _flatten(expr: SglExpr) -> list[SglExpr]:
    return list(expr.expr_list) if isinstance(expr, SglExprList) else [expr]


class SglExprList(SglExpr):
    __slots__ = ("expr_list",)
    kind = "expr_list"

    def __init__(self, expr_list: list[SglExpr]) -> None:
        self.expr_list = expr_list

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


class SglConstantText(SglExpr):
    __slots__ = ("value",)
    kind = "constant_text"

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglGen(SglExpr):
    __slots__ = ("name", "sampling_params")
    kind = "gen"

    def __init__(self, name: str | None, sampling_params: SamplingParams) -> None:
        self.name = name
        self.sampling_params = sampling_params

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    __slots__ = ("name", "choices", "temperature", "choices_method")
    kind = "select"

    def __init__(
        self,
        name: str | None,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> None:
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices!r})"


class SglRoleBegin(SglExpr):
    __slots__ = ("role",)
    kind = "role_begin"

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    __slots__ = ("role",)
    kind = "role_end"

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglImage(SglExpr):
    __slots__ = ("path",)
    kind = "image"

    def __init__(self, path: Any) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"Image({str(self.path)[:40]!r})"


class SglVideo(SglExpr):
    __slots__ = ("path", "num_frames")
    kind = "video"

    def __init__(self, path: str, num_frames: int) -> None:
        self.path = path
        self.num_frames = num_frames

    def __repr__(self) -> str:
        return f"Video({self.path!r}, {self.num_frames})"


class SglVariable(SglExpr):
    """A variable of another state, appended as text once it is ready."""

    __slots__ = ("name", "source")
    kind = "variable"

    def __init__(self, name: str, source: Any) -> None:
        self.name = name
        self.source = source

    def __repr__(self) -> str:
        return f"Variable({self.name!r})"


class SglVarScopeBegin(SglExpr):
    __slots__ = ("name",)
    kind = "var_scope_begin"

    def __init__(self, name: str) -> None:
        self.name = name


class SglVarScopeEnd(SglExpr):
    __slots__ = ("name",)
    kind = "var_scope_end"

    def __init__(self, name: str) -> None:
        self.name = name


class SglCommitLazy(SglExpr):
    __slots__ = ()
    kind = "commit_lazy"


class SglConcateAndAppend(SglExpr):
    __slots__ = ("states",)
    kind = "concate_and_append"

    def __init__(self, states: list[Any]) -> None:
        self.states = states


class SglSeparateReasoning(SglExpr):
    """Splits a generated variable into ``<name>_reasoning_content`` and the answer."""

    __slots__ = ("model_type", "expr", "name")
    kind = "separate_reasoning"

    def __init__(self, model_type: str | None, expr: SglExpr | None) -> None:
        self.model_type = model_type
        self.expr = expr
        self.name: str | None = None
        self._process_expr(expr)

    def process_name_for_reasoning(self, name: str | None) -> str:
        """The variable the reasoning of variable ``name`` goes to (SGLang's rule)."""
        if not name:
            from sglrun.errors import InvalidArgumentError

            raise InvalidArgumentError("separate_reasoning needs a named gen or select")
        return f"{name}_reasoning_content"

    def _process_expr(self, expr: SglExpr | None) -> None:
        if isinstance(expr, (SglGen, SglSelect)):
            self.name = self.process_name_for_reasoning(expr.name)
        elif isinstance(expr, SglExprList):  # as SGLang: the last gen or select names it
            for item in expr.expr_list:
                self._process_expr(item)

    def __repr__(self) -> str:
        return f"SeparateReasoning(model_type={self.model_type}, name={self.name})"


class SglArgument(SglExpr):
    """A program argument not given to ``trace()``: appended, it shows as ``{name}``; an
    f-string of it raises, as SGLang's tracer does (its value is not known)."""

    __slots__ = ("name", "value")
    kind = "argument"

    def __init__(self, name: str, value: Any = None) -> None:
        self.name = name
        self.value = value

    def __format__(self, spec: str) -> str:
        raise TypeError(
            f"cannot put argument {self.name!r} inside an f-string while tracing: "
            "its value is not known; append it with + instead"
        )

    def __repr__(self) -> str:
        return f"Argument(name={self.name}, value={self.value!r})"

    __str__ = __repr__


SglSamplingParams = SamplingParams  # SGLang's name


def __getattr__(name: str) -> Any:
    """``SglFunction`` under SGLang's module path (it lives in ``sglrun.lang.function``,
    which imports this module)."""
    if name == "SglFunction":
        from sglrun.lang.function import SglFunction

        return SglFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
