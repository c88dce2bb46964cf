"""What a command loads before it runs: the program, its arguments, the settings, the backend.

A program file is Python run with the user's rights, the way pytest runs test files. Every
failure here is one line naming the file (and the line, for syntax errors) or the flag, because
the CLI prints it as-is and exits 2 before any row runs. Backends are imported only when built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
import traceback
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sglrun.errors import InputError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings
    from sglrun.lang.backend import Backend
    from sglrun.lang.function import SglFunction
    from sglrun.lang.registry import BackendOptions

__all__ = [
    "ProgramLoadError",
    "auto_threads",
    "backend_options",
    "build_backend",
    "check_mapping",
    "describe_engine",
    "describe_parameters",
    "describe_program",
    "find_functions",
    "load_module",
    "load_program",
    "program_arguments",
    "resolve_settings",
]


class ProgramLoadError(InputError):
    """The program file is missing, broken, or holds no (or no such) ``@function``."""


def _module_name(path: str) -> str:
    """A private, stable module name: two files with the same stem must not collide."""
    stem = os.path.splitext(os.path.basename(path))[0]
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in stem) or "program"
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    return f"_sglrun_program_{safe}_{digest}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _failing_line(exc: BaseException, path: str) -> str:
    """``:N`` for the deepest traceback frame inside the program file, if any."""
    target = os.path.abspath(path)
    line = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename and os.path.abspath(frame.filename) == target:
            line = f":{frame.lineno}"
    return line


def load_module(path: str) -> ModuleType:
    """Execute ``path`` as a fresh module; its directory goes on ``sys.path`` for its imports."""
    if not os.path.exists(path):
        raise ProgramLoadError(f"{path}: no such program file")
    if os.path.isdir(path):
        raise ProgramLoadError(f"{path}: is a directory, not a program file")
    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError as exc:
        raise ProgramLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise ProgramLoadError(f"{where}: syntax error: {_one_line(exc.msg)}") from None
    except ValueError as exc:  # null bytes and the like
        raise ProgramLoadError(f"{path}: not a Python file ({_one_line(str(exc))})") from None

    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ProgramLoadError(f"{path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    module.__file__ = os.path.abspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise ProgramLoadError(f"{path}: exited while loading (SystemExit {exc.code})") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        message = _one_line(str(exc)) or type(exc).__name__
        raise ProgramLoadError(
            f"{path}{_failing_line(exc, path)}: error while loading: "
            f"{type(exc).__name__}: {message}"
        ) from None
    return module


def find_functions(module: ModuleType) -> dict[str, SglFunction]:
    """The module's ``@function`` programs in definition order.

    Programs defined in the file come first; imported ones count only when the file defines
    none itself (a file that just re-exports a program still works).
    """
    from sglrun.lang.function import SglFunction

    found = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, SglFunction) and not name.startswith("__")
    }
    own = {
        name: fn
        for name, fn in found.items()
        if getattr(fn.func, "__module__", None) == module.__name__
    }
    return own or found


def load_program(path: str, function_name: str | None = None) -> SglFunction:
    """The one program to run from ``path``; ``function_name`` picks among several."""
    functions = find_functions(load_module(path))
    names = ", ".join(functions)
    if not functions:
        raise ProgramLoadError(
            f"{path}: no @function found (decorate a program with @sglrun.function)"
        )
    if function_name is not None:
        if function_name not in functions:
            raise ProgramLoadError(f"{path}: no @function named {function_name!r}; found: {names}")
        return functions[function_name]
    if len(functions) > 1:
        raise ProgramLoadError(f"{path}: several @functions ({names}); choose one with --function")
    return next(iter(functions.values()))


# ----------------------------------------------------------------------------- arguments


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def program_arguments(fn: SglFunction, tokens: list[str]) -> dict[str, Any]:
    """Keyword arguments from ``--name value`` / ``--name=value`` tokens (``sglrun run``),
    converted by the parameters' annotations; a bool flag may stand alone."""
    from sglrun.batch.convert import convert_row, param_specs

    specs = param_specs(fn.func)
    by_name = {spec.name: spec for spec in specs}
    listed = ", ".join(_option(name) for name in by_name) or "none"
    raw: dict[str, str] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise InputError(
                f"unexpected argument {token!r}; give {fn.name}'s parameters as --name value "
                f"({listed})"
            )
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if key not in by_name:
            raise InputError(f"unknown parameter --{name}; {fn.name} takes: {listed}")
        if not eq:
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            if following is not None and not following.startswith("--"):
                value = following
                index += 1
            elif by_name[key].annotation is bool:
                value = "true"
            else:
                raise InputError(f"--{name} needs a value")
        raw[key] = value
        index += 1
    try:
        converted = convert_row(raw, specs, source=f"sglrun run {fn.name}")
    except InputError as exc:  # speak of --options, not of columns
        message = str(exc)
        for spec in specs:
            message = message.replace(f"column {spec.name!r}", _option(spec.name))
        raise InputError(message) from None
    return fn.bind_call((), converted)


def check_mapping(fn: SglFunction, mapping: dict[str, str]) -> None:
    """``--map param=column`` must name parameters; checked before any row runs."""
    names = [p.name for p in fn.arg_params]
    for param in mapping:
        if param not in names:
            raise InputError(
                f"--map names {param!r}, which is not a parameter of {fn.name} "
                f"({', '.join(names) or 'none'})"
            )


def _annotation_text(annotation: Any) -> str:
    if annotation is None:
        return ""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parameter_lines(fn: SglFunction, indent: str, *, as_options: bool = False) -> list[str]:
    """One line per parameter of ``fn``: name (or ``--name``), type, default or required."""
    from sglrun.batch.convert import param_specs

    lines = []
    for spec in param_specs(fn.func):
        kind = _annotation_text(spec.annotation)
        name = _option(spec.name) if as_options else spec.name
        text = f"{indent}{name}" + (f": {kind}" if kind else "")
        lines.append(text + (f" = {spec.default!r}" if spec.has_default else "  (required)"))
    return lines or [f"{indent}(none)"]


def describe_parameters(fn: SglFunction) -> str:
    """The part of ``sglrun run PROGRAM --help`` about the program itself."""
    doc = (fn.func.__doc__ or "").strip()
    head = [f"Program {fn.name} ({fn.func.__code__.co_filename}):"]
    if doc:
        head += ["", *("  " + line.strip() for line in doc.splitlines())]
    return "\n".join(
        [*head, "", "Program parameters (after --):", *parameter_lines(fn, "  ", as_options=True)]
    )


def describe_program(fn: SglFunction, sample: dict[str, Any]) -> str:
    """What ``sglrun inspect`` prints: parameters, the variables a dry run produces and the
    prompt of ``sample`` (missing parameters show as ``{name}``); no model is called."""
    from sglrun.batch.convert import convert_row, param_specs, takes_rest

    specs = param_specs(fn.func)
    names = [spec.name for spec in specs]
    unknown = [key for key in sample if key not in names]
    if unknown and not takes_rest(fn.func):
        raise InputError(
            f"--row: {fn.name} has no parameter(s) {', '.join(unknown)} "
            f"(parameters: {', '.join(names) or 'none'})"
        )
    given = [spec for spec in specs if spec.name in sample]
    arguments = fn.by_parameter(
        convert_row(sample, given, source="--row", rest=takes_rest(fn.func))
    )
    lines = [f"{fn.name}({', '.join(names)})"]
    doc = (fn.func.__doc__ or "").strip().splitlines()
    if doc:
        lines.append(f"  {doc[0]}")
    lines.append("  parameters:")
    lines.extend(parameter_lines(fn, "    "))
    from sglrun.lang.tracing import dry_run, needs_of

    state = dry_run(fn, arguments)  # placeholders as text: a program may compute on them
    error = state.error()
    variables = list(state.variables())
    lines.append("  variables: " + (", ".join(variables) if variables else "(none)"))

    try:
        needs = needs_of(fn, arguments)
    except Exception:  # the dry run's own failure is reported below
        needs = {}
    if needs:
        shown = ", ".join(f"{need} ({name})" if name else need for need, name in needs.items())
        lines.append(f"  needs of a backend: {shown}")
    if error is not None:
        lines.append(f"  dry run stopped: {type(error).__name__}: {_one_line(str(error))}")
    lines.append("  prompt" + (" (sample row)" if sample else " ({param} = not given)") + ":")
    lines.extend("    " + line for line in state.text().splitlines())
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- settings, backend


def resolve_settings(
    flags: dict[str, Any], *, config_file: str | None, profile: str | None
) -> tuple[Settings, str]:
    """Flags > env > project file > user file; returns the settings and the backend name."""
    from sglrun.cli.config import load_settings

    settings = load_settings(flags=flags, config_file=config_file, profile=profile)
    return settings, settings.backend


def backend_options(settings: Settings, *, insecure: bool = False) -> BackendOptions:
    """What the settings say about a backend, in the registry's terms. The API key is read
    from the environment now, for the backend only, and never printed."""
    from sglrun.lang.registry import BackendOptions

    return BackendOptions(
        model=settings.model,
        urls=tuple(settings.url or ()),
        api_key=settings.api_key(),
        timeout=settings.timeout,
        retries=settings.retries,
        verify=False if insecure else None,
        coalesce=settings.coalesce,
        engine_threads=None if settings.engine_threads == "auto" else int(settings.engine_threads),
        slots=settings.slots,
        ctx_size=settings.ctx_size,
        reproducible=settings.reproducible,
    )


def describe_engine(settings: Settings) -> str:
    """What the embedded engine would run with (``config show``), found without loading it."""
    from sglrun.backends.llamacpp_support import CTX_PER_SLOT, DEFAULT_SLOTS, default_threads
    from sglrun.backends.model_path import resolve_model_path

    try:
        gguf = str(resolve_model_path(settings.model))
    except Exception as exc:  # a missing model file is shown, not fatal, here
        gguf = f"(not found: {_one_line(str(exc))})"
    threads = settings.engine_threads
    shown = f"{threads}" if threads != "auto" else f"auto = {default_threads()} now"
    slots = 1 if settings.reproducible else settings.slots or DEFAULT_SLOTS
    context = settings.ctx_size or slots * CTX_PER_SLOT
    return (
        f"engine: {gguf}, {shown} threads, {slots} slots, "
        f"context {context} tokens ({context // slots} per slot)"
        + (", reproducible (no prompt reuse)" if settings.reproducible else "")
    )


def build_backend(
    settings: Settings,
    name: str,
    *,
    insecure: bool = False,
    extra: dict[str, Any] | None = None,
) -> Backend:
    """The backend the settings name, by the registry (imported only now: the local one
    loads a model); ``extra`` goes to the backend as ``BackendOptions.extra``."""
    from sglrun.lang.registry import backend_entry

    entry = backend_entry(name)
    if entry.needs_model and not settings.model:
        raise InputError(f"the {name} backend needs a model name: pass --model NAME")
    if name == "anthropic" and settings.api_key() is None:
        raise InputError(
            f"the anthropic backend needs an API key: set {settings.api_key_env} "
            "(or name another variable with --api-key-env)"
        )
    try:
        options = backend_options(settings, insecure=insecure)
        if extra:
            options = dataclasses.replace(options, extra={**options.extra, **extra})
        backend = entry.factory(options)
    except ImportError as exc:
        raise InputError(f"the {name} backend is not available: {exc}") from None
    pool = getattr(getattr(backend, "transport", None), "pool", None)
    urls = list(getattr(pool, "urls", []))
    if insecure and any(str(url).startswith("https://") for url in urls):
        # Once per run, not once per request.
        sys.stderr.write("sglrun: warning: --insecure: server certificates are not verified\n")
    return backend


def auto_threads(settings: Settings, name: str, backend: Backend) -> int:
    """``--concurrency N``, or for ``auto`` the scheduler's policy for the backend (the same
    as ``run_batch(num_threads="auto")``)."""
    from sglrun.lang.scheduler import auto_concurrency

    if isinstance(settings.concurrency, int):
        return settings.concurrency
    return auto_concurrency(backend)
