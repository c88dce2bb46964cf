"""Running a program without a model: ``trace()``, ``sglrun inspect`` and shared prefixes.

A dry run drives the real interpreter against ``PlaceholderBackend``: every ``gen`` yields
``{name}`` and every ``select`` its first choice, so the prompt a row would produce can be
shown (and the text all rows share found) without an engine, a server or a request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglrun.lang.backend import Backend, GenerateRequest, GenerateResult, SelectRequest
from sglrun.lang.chat_template import ChatTemplate, get_chat_template
from sglrun.lang.choices import ChoicesDecision
from sglrun.lang.global_config import dry_run_backend, global_config
from sglrun.lang.ir import SamplingParams, SglArgument, SglExpr, SglExprList
from sglrun.lang.registry import BackendOptions, default_backend_entry
from sglrun.lang.runtime import execute, new_state
from sglrun.lang.state import ProgramState

if TYPE_CHECKING:
    from sglrun.lang.function import SglFunction

__all__ = [
    "PlaceholderBackend",
    "StopTracing",
    "TracerProgramState",
    "dry_run",
    "extract_prefix_by_tracing",
    "first_prompt",
    "missing_capabilities",
    "needs_of",
    "shared_prefix",
]

PLACEHOLDER = "{{{name}}}"


class PlaceholderBackend(Backend):
    """Answers without a model: ``{name}`` for a gen, the first choice for a select."""

    name = "dry run"
    cooperative = True

    def cache_identity(self) -> None:
        """Placeholders are never cached."""
        return None

    def __init__(self, chat_template: ChatTemplate) -> None:
        self.template = chat_template
        self.needs: dict[str, str] = {}  # capability -> the first variable that needed it
        self.prompts: list[str] = []  # the prompt of every request, in order

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    def _note(self, request: GenerateRequest | SelectRequest) -> None:
        self.prompts.append(request.prompt)
        for capability in request.needs():
            self.needs.setdefault(capability, request.name or "")

    def generate(self, request: GenerateRequest, on_chunk: Any = None) -> GenerateResult:
        self._note(request)
        text = PLACEHOLDER.format(name=request.name or "gen")
        count = request.params.n or 1
        return GenerateResult(text if count == 1 else [text] * count, {"dry_run": True})

    def select(self, request: SelectRequest) -> ChoicesDecision:
        self._note(request)
        return ChoicesDecision(request.choices[0], {"dry_run": True})


def needs_of(
    function: SglFunction, arguments: dict[str, Any], chat_template: ChatTemplate | None = None
) -> dict[str, str]:
    """What a dry run of ``function`` on ``arguments`` needs of a backend: each capability
    with the first variable that needed it (``Backend.supports`` then says yes or no)."""
    backend = PlaceholderBackend(chat_template or _template_for_dry_run())
    _dry(function, arguments, backend)
    return backend.needs


def missing_capabilities(
    function: SglFunction, arguments: dict[str, Any], backend: Backend
) -> list[tuple[str, str]]:
    """``(capability, variable)`` for what the program needs and ``backend`` cannot do."""
    needs = needs_of(function, arguments, backend.get_chat_template())
    return [(need, name) for need, name in needs.items() if not backend.supports(need)]


def first_prompt(
    function: SglFunction, arguments: dict[str, Any], chat_template: ChatTemplate | None = None
) -> str | None:
    """The prompt of the program's first model call on ``arguments`` (None: it makes none),
    found by a dry run; the program's own exception propagates."""
    backend = PlaceholderBackend(chat_template or _template_for_dry_run())
    state = _dry(function, arguments, backend)
    error = state.error()
    if error is not None and not backend.prompts:
        raise error
    return backend.prompts[0] if backend.prompts else None


def _template_for_dry_run() -> ChatTemplate:
    """The template the default backend would use, without starting it."""
    if global_config.default_backend is not None:
        return global_config.default_backend.get_chat_template()
    entry = default_backend_entry()
    if entry is not None and entry.chat_template is not None:
        try:
            return entry.chat_template(BackendOptions())
        except Exception:  # no model installed, say: a dry run still shows the prompt
            pass
    return get_chat_template("default")


def dry_run(
    function: SglFunction,
    arguments: dict[str, Any],
    chat_template: ChatTemplate | None = None,
) -> ProgramState:
    """Run without a model: gens produce ``{name}`` placeholders, selects their first choice.
    Missing arguments become ``{param}`` placeholders too."""
    template = chat_template or _template_for_dry_run()
    return _dry(function, arguments, PlaceholderBackend(template))


class TracerProgramState(ProgramState):
    """What ``trace()`` returns, as SGLang's tracer does: the state of a dry run, with the
    nodes the program appended (``nodes``, ``last_node``, ``flatten_nodes()``)."""

    __slots__ = ()

    @property
    def nodes(self) -> list[SglExpr]:
        return self.executor.traced or []

    @property
    def last_node(self) -> SglExpr | None:
        nodes = self.nodes
        return nodes[-1] if nodes else None

    def flatten_nodes(self) -> list[SglExpr]:
        """The nodes with every expression list expanded, in order."""
        flat: list[SglExpr] = []

        def walk(node: SglExpr) -> None:
            if isinstance(node, SglExprList):
                for item in node.expr_list:
                    walk(item)
            else:
                flat.append(node)

        for node in self.nodes:
            walk(node)
        return flat


def trace(function: SglFunction, arguments: dict[str, Any]) -> TracerProgramState:
    """``SglFunction.trace``: a dry run where a missing argument is an ``SglArgument`` (an
    f-string of it raises ``TypeError``), recording the nodes; the program's own exception
    is raised, as SGLang's tracer raises it."""
    backend = PlaceholderBackend(_template_for_dry_run())
    state = _dry(function, arguments, backend, traced=True)
    if state.executor.body_error is not None:
        raise state.executor.body_error
    assert isinstance(state, TracerProgramState)
    return state


def _dry(
    function: SglFunction, arguments: dict[str, Any], backend: Backend, *, traced: bool = False
) -> ProgramState:
    filled: dict[str, Any] = {}
    for param in function.arg_params:
        if param.name in arguments:
            filled[param.name] = arguments[param.name]
        elif param.default is not param.empty:
            filled[param.name] = param.default
        elif param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            missing = SglArgument(param.name) if traced else PLACEHOLDER.format(name=param.name)
            filled[param.name] = missing
    template = backend.get_chat_template()
    state = new_state(function, backend, filled, SamplingParams.defaults(), chat_template=template)
    if traced:
        state.executor.traced = []
        state = TracerProgramState(state.executor)
    with dry_run_backend(backend):  # programs it calls make no model call either
        execute(function, state, filled)
    return state


def shared_prefix(
    function: SglFunction,
    rows: list[dict[str, Any]] | None = None,
    chat_template: ChatTemplate | None = None,
) -> str:
    """The prompt text every run starts with: what precedes the first argument-dependent text
    or generation, found by two dry runs."""
    if rows:
        samples = rows[:2]
    else:  # distinct markers per run: the texts part where the first argument appears
        samples = [{p.name: f"\x00{i}{p.name}" for p in function.arg_params} for i in (0, 1)]
    texts = []
    for row in samples:
        text = dry_run(function, row, chat_template).text()
        cut = text.find("{")  # a gen's dry-run placeholder: nothing after it is shared
        texts.append(text if cut < 0 else text[:cut])
    first, second = texts[0], texts[-1]
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return first[:length].split("\x00")[0]


class StopTracing(Exception):  # noqa: N818 - SGLang's name
    """SGLang's tracer stops a prefix trace with it; importable for code that catches it."""


def extract_prefix_by_tracing(program: SglFunction, backend: Backend | None = None) -> str:
    """SGLang's name for ``shared_prefix``: the prompt text every run of ``program`` starts
    with (what ``run_batch`` pre-caches when it is over 64 characters)."""
    template = backend.get_chat_template() if backend is not None else None
    return shared_prefix(program, None, template)
