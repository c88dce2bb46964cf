"""The ``sglrun`` command line: ``batch``, ``run``, ``inspect`` and ``config show``.

Start-up stays fast (``sglrun --help`` well under 0.3 s): only typer is imported here; the
readers, writers, Rich, orjson and every backend are imported inside the commands that use
them. Errors before any row runs are one line on stderr and exit 2; stdout carries only data.

Exit codes: 0 every row ok, 1 some rows failed, 2 usage or input error, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from typer.core import TyperGroup

from sglrun.errors import InputError, SglrunError

if TYPE_CHECKING:
    from sglrun.cli.config import Settings
    from sglrun.lang.backend import Backend
    from sglrun.lang.function import SglFunction

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "app", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_INVOCATION: list[str] = []  # the arguments of this invocation, for the --resume hint
_STANDALONE = False  # True only when main() runs the real process (may os._exit)


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    _say(f"sglrun: error: {_one_line(message)}")
    raise typer.Exit(code)


@contextmanager
def _usage_errors() -> Iterator[None]:
    """SglrunErrors raised while setting up (before any row runs) are exit 2, one line."""
    try:
        yield
    except SglrunError as exc:
        _fail(str(exc) or type(exc).__name__)


class _OneLineErrors(TyperGroup):
    """Usage errors as one ``sglrun: error:`` line, and the same exit codes whether run as
    the console script or through typer's CliRunner."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from typer._click.exceptions import ClickException  # typer's own copy of click

        args = list(sys.argv[1:] if args is None else args)
        _INVOCATION[:] = args
        try:
            result = super().main(
                args=args,
                prog_name=prog_name or "sglrun",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = result if isinstance(result, int) else EXIT_OK
        except ClickException as exc:
            code = exc.exit_code
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # `sglrun batch` alone prints the help
            else:
                ctx = getattr(exc, "ctx", None)
                where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _say(f"sglrun: error: {_one_line(exc.format_message())}{where}")
        except typer.Abort:
            code = EXIT_INTERRUPTED
        except Exception as exc:  # a bug: one line; the traceback with -v or SGLRUN_TRACEBACK
            if os.environ.get("SGLRUN_TRACEBACK") or "-v" in args or "--verbose" in args:
                import traceback

                traceback.print_exc()
            _say(f"sglrun: internal error: {type(exc).__name__}: {_one_line(exc)}")
            code = EXIT_FAILED
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    name="sglrun",
    help="Run SGLang frontend programs (@sglrun.function) once, or over a JSONL/CSV file.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: no Rich import, fast start
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(
    help="Show the resolved configuration.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        from sglrun import __version__

        typer.echo(f"sglrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Run SGLang frontend programs (@sglrun.function) once, or over a JSONL/CSV file."""


# ----------------------------------------------------------------------------- shared flags


def _opt(kind: Any, *names: str, help: str, metavar: str | None = None) -> Any:
    """An optional flag's annotation (None = not given, so settings files may fill it)."""
    return Annotated[Optional[kind], typer.Option(*names, help=help, metavar=metavar)]


def _switch(*names: str, help: str) -> Any:
    return Annotated[bool, typer.Option(*names, help=help)]


BackendOpt = _opt(
    str, "--backend", metavar="NAME",
    help="local (embedded llama.cpp, the default), sglang, openai or anthropic.",
)  # fmt: skip
ModelOpt = _opt(
    str, "--model", metavar="NAME", help="GGUF path for local; the model for openai/anthropic."
)
UrlOpt = _opt(
    list[str], "--url", metavar="URL",
    help="Server URL; repeat for several sglang servers [sglang: http://127.0.0.1:30000].",
)  # fmt: skip
ApiKeyEnvOpt = _opt(
    str, "--api-key-env", metavar="NAME",
    help="Environment variable that holds the API key (the key is never printed).",
)  # fmt: skip
TemperatureOpt = _opt(float, "--temperature", metavar="T", help="Default temperature for gens.")
MaxTokensOpt = _opt(int, "--max-new-tokens", metavar="N", help="Default max tokens for gens.")
TopPOpt = _opt(float, "--top-p", metavar="P", help="Default top-p.")
TopKOpt = _opt(int, "--top-k", metavar="K", help="Default top-k (-1 = off).")
StopOpt = _opt(list[str], "--stop", metavar="TEXT", help="Default stop string (repeatable).")
ThreadsOpt = _opt(str, "--num-threads", metavar="auto|N", help="Rows in parallel [auto].")
ConfigOpt = _opt(str, "--config", metavar="FILE", help="Settings file (replaces sglrun.yaml).")
ProfileOpt = _opt(str, "--profile", metavar="NAME", help="Settings profile to use.")
FunctionOpt = _opt(str, "--function", metavar="NAME", help="The @function, if there are several.")
QuietOpt = _switch("-q", "--quiet", help="No progress display; the summary line only.")
VerboseOpt = _switch("-v", "--verbose", help="Log what sglrun does (INFO) to stderr.")
InsecureOpt = _switch("--insecure", help="Do not verify TLS certificates of server backends.")
ProgramArg = Annotated[
    str, typer.Argument(metavar="PROGRAM", help="Python file with a @sglrun.function.")
]


@dataclasses.dataclass
class _Shared:
    """The flags ``run`` and ``batch`` share."""

    backend: str | None = None
    model: str | None = None
    url: list[str] | None = None
    api_key_env: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
    num_threads: str | None = None
    config: str | None = None
    profile: str | None = None
    quiet: bool = False
    verbose: bool = False
    insecure: bool = False

    @classmethod
    def pick(cls, values: dict[str, Any]) -> _Shared:
        """The shared flags out of a command's parameters (``locals()``)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def settings(self) -> tuple[Settings, str]:
        """Flags > env > project file > user file, and the backend name."""
        from sglrun.cli.loader import resolve_settings

        keys = ("backend", "model", "api_key_env", "temperature", "max_new_tokens", "top_p")
        flags = {key: getattr(self, key) for key in (*keys, "top_k", "num_threads")}
        flags.update(url=self.url or None, stop=self.stop or None)  # [] = not given
        return resolve_settings(flags, config_file=self.config, profile=self.profile)


def _setup_logging(verbose: bool) -> None:
    """``-v``: INFO from every ``sglrun.*`` logger on (the current) stderr."""
    import logging

    root = logging.getLogger("sglrun")
    for handler in list(root.handlers):
        if getattr(handler, "_sglrun_cli", False):
            root.removeHandler(handler)
    if not verbose:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._sglrun_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("sglrun: %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _defaults(settings: Settings) -> Any:
    from sglrun.lang.ir import SamplingParams

    return SamplingParams.defaults(**settings.sampling_params())


def _shutdown(backend: Any) -> None:
    try:
        backend.shutdown()
    except Exception:
        pass


# ----------------------------------------------------------------------------- batch

BATCH_HELP = """Run PROGRAM on every row of INPUT and write one JSON record per row.

INPUT is a .jsonl or .csv file, or - for stdin (then say --format if it is CSV). Row keys
(CSV columns) fill the function's parameters by name, converted by their annotations.

OUTPUT defaults to <input stem>.out.jsonl next to the input, or stdout when INPUT is -.
Each line is {"id": ..., "vars": {...}, "error": null | {"type": ..., "message": ...}}, plus
input/text/messages/meta with --include. Records are written (and flushed) as rows finish.

Exit codes: 0 every row ok, 1 some rows failed, 2 usage or input error, 130 interrupted
(run the same command again with --resume to finish).
"""


def _split_list(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _parse_map(values: list[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for value in values or []:
        param, eq, column = value.partition("=")
        if not eq or not param.strip() or not column.strip():
            raise InputError(f"--map expects param=column, got {value!r}")
        mapping[param.strip()] = column.strip()
    return mapping


def _default_output(input_path: str) -> str:
    if input_path == "-":
        return "-"
    directory, base = os.path.split(input_path)
    return os.path.join(directory, f"{os.path.splitext(base)[0] or base}.out.jsonl")


def _check_output(output: str, input_path: str) -> None:
    if output == "-":
        import io

        usable = sys.stdout is not None
        if usable:
            try:
                os.fstat(sys.stdout.fileno())
            except io.UnsupportedOperation:  # not a file (a test runner's buffer): fine
                pass
            except (OSError, ValueError):  # descriptor 1 is closed
                usable = False
        if not usable:
            raise InputError("stdout is closed: give the output a file with -o FILE")
        return
    if output.lower().endswith((".csv", ".tsv")):
        raise InputError(f"{output}: sglrun writes JSON Lines; name the output .jsonl (or -)")


def _resume_hint(output: str) -> str:
    import shlex

    from sglrun.backends.http_support import mask_url

    if output == "-":
        return "sglrun: interrupted; to resume later, write to a file with -o FILE and --resume"
    args = [mask_url(arg) for arg in _INVOCATION if arg != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return "sglrun: interrupted; to continue, run: " + shlex.join(["sglrun", *args])


@app.command(help=BATCH_HELP, no_args_is_help=True)
def batch(
    program: ProgramArg,
    input_path: Annotated[str, typer.Argument(metavar="INPUT", help=".jsonl, .csv, or -.")],
    output: _opt(
        str,
        "-o",
        "--output",
        metavar="OUTPUT",
        help="A .jsonl file or - for stdout [default: <input stem>.out.jsonl, or stdout].",
    ) = None,  # fmt: skip
    function: FunctionOpt = None,
    maps: _opt(
        list[str], "--map", metavar="PARAM=COLUMN", help="Fill PARAM from COLUMN (repeatable)."
    ) = None,
    id_field: _opt(str, "--id-field", metavar="NAME", help="Row key used as the id.") = None,
    strict: _switch("--strict", help="A row key that is no parameter is an error.") = False,
    unordered: _switch("--unordered", help="Write records as rows finish.") = False,
    window: _opt(int, "--window", metavar="N", help="Records held back to keep order.") = None,
    resume: _switch("--resume", help="Append to OUTPUT, skipping ids already in it.") = False,
    retry_errors: _switch("--retry-errors", help="Resume and run failed ids again.") = False,
    overwrite: _switch("--overwrite", help="Replace an existing OUTPUT (once done).") = False,
    force: _switch(
        "--force", help="Resume although the input or program changed: rerun changed rows."
    ) = False,
    row_timeout: _opt(
        float, "--row-timeout", metavar="SECONDS",
        help="A row running longer is an error record, the batch goes on (0: none) [600].",
    ) = None,  # fmt: skip
    include: _opt(
        list[str], "--include", metavar="FIELDS", help="Add input,text,messages,meta."
    ) = None,
    stream: _switch("--stream", help="Show the text of rows in flight (terminal).") = False,
    limit: _opt(int, "--limit", metavar="N", help="Only the first N rows.") = None,
    input_format: _opt(str, "--format", metavar="jsonl|csv", help="Input format.") = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    url: UrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    temperature: TemperatureOpt = None,
    max_new_tokens: MaxTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    stop: StopOpt = None,
    num_threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    insecure: InsecureOpt = False,
) -> None:
    shared = _Shared.pick(locals())
    _setup_logging(verbose)
    from sglrun.batch.runner import INCLUDE_FIELDS
    from sglrun.cli.batch_job import BatchJob
    from sglrun.cli.loader import check_mapping, load_program

    with _usage_errors():
        fields = set(_split_list(include))
        unknown = sorted(fields - set(INCLUDE_FIELDS))
        if unknown:
            raise InputError(
                f"--include: unknown field(s) {', '.join(unknown)}; "
                f"choose from {','.join(INCLUDE_FIELDS)}"
            )
        for flag, value in (("--window", window), ("--limit", limit)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be >= 1, got {value}")
        if overwrite and (resume or retry_errors):
            raise InputError("--overwrite replaces the output, --resume continues it: give one")
        if force and not (resume or retry_errors):
            raise InputError("--force goes with --resume (it accepts a changed input or program)")
        if row_timeout is not None and row_timeout < 0:
            raise InputError(f"--row-timeout must be >= 0 seconds (0: none), got {row_timeout}")
        mapping = _parse_map(maps)
        settings, backend_name = shared.settings()
        fn = load_program(program, function)
        check_mapping(fn, mapping)
        out = output if output is not None else _default_output(input_path)
        _check_output(out, input_path)
        job = BatchJob(
            fn, shared, settings, backend_name, input_path=input_path, out=out,
            input_format=input_format, id_field=id_field, mapping=mapping, strict=strict,
            ordered=not unordered, window=window, resume=resume or retry_errors,
            retry_errors=retry_errors, include=fields, stream=stream, limit=limit,
            overwrite=overwrite, force=force, program_path=program,
            row_timeout=row_timeout,
        )  # fmt: skip
        job.prepare()
    job.run()


# ----------------------------------------------------------------------------- run

RUN_HELP = """Run PROGRAM once and print what it generates.

Program parameters follow a -- as --name value (converted by their annotations), e.g.
sglrun run programs/summarize.py -- --text "...". The text streams to stdout as it is
generated, then the variables are printed as JSON; --json prints only the JSON.
"""


@app.command(
    help=RUN_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    no_args_is_help=True,
)
def run(
    ctx: typer.Context,
    program: ProgramArg,
    function: FunctionOpt = None,
    json_only: _switch("--json", help="Print only the variables, as JSON.") = False,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    url: UrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    temperature: TemperatureOpt = None,
    max_new_tokens: MaxTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    stop: StopOpt = None,
    num_threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    insecure: InsecureOpt = False,
) -> None:
    shared = _Shared.pick(locals())
    _setup_logging(verbose)
    from sglrun.cli.loader import build_backend, load_program, program_arguments

    with _usage_errors():
        settings, backend_name = shared.settings()
        fn = load_program(program, function)
        arguments = program_arguments(fn, list(ctx.args))
        chosen = build_backend(settings, backend_name, insecure=insecure)
    _run_once(fn, chosen, settings, arguments, json_only)


def _run_once(
    fn: SglFunction,
    backend: Backend,
    settings: Settings,
    arguments: dict[str, Any],
    json_only: bool,
) -> NoReturn:
    """Stream the text (unless --json), then print the variables; exit 1 if the program
    failed."""
    import json

    from sglrun.batch.runner import error_info
    from sglrun.batch.writers import to_jsonable
    from sglrun.lang.runtime import run_program

    out = sys.stdout
    try:
        state = run_program(fn, backend, arguments, _defaults(settings), stream=not json_only)
        if not json_only:
            ended_with_newline = True
            for piece in state.text_iter():
                out.write(piece)
                out.flush()
                ended_with_newline = piece.endswith("\n")
            if not ended_with_newline:
                out.write("\n")
        error = state.error()
        variables = state.variables()
    except KeyboardInterrupt:
        _say("sglrun: interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    out.write(json.dumps(to_jsonable(variables), ensure_ascii=False, indent=2) + "\n")
    out.flush()
    _shutdown(backend)
    if error is not None:
        info = error_info(error) or {}
        _fail(f"{info.get('type')}: {info.get('message')}", EXIT_FAILED)
    raise typer.Exit(EXIT_OK)


# ----------------------------------------------------------------------------- inspect


@app.command("inspect", no_args_is_help=True)
def inspect_command(
    program: ProgramArg,
    function: _opt(str, "--function", metavar="NAME", help="Only this @function.") = None,
    row: _opt(str, "--row", metavar="JSON", help='A sample row, e.g. \'{"text": "hi"}\'.') = None,
) -> None:
    """List a program's functions, parameters and variables, and show the prompt a row makes
    (a dry run: no model is called; gens show as {name})."""
    import json

    from sglrun.cli.loader import describe_program, find_functions, load_module, load_program

    with _usage_errors():
        sample: Any = {}
        if row is not None:
            try:
                sample = json.loads(row)
            except ValueError as exc:
                raise InputError(f"--row is not valid JSON ({exc})") from None
            if not isinstance(sample, dict):
                raise InputError("--row must be a JSON object of parameter values")
        if function is not None:
            functions = {function: load_program(program, function)}
        else:
            functions = find_functions(load_module(program))
            if not functions:
                load_program(program)  # raises the "no @function" error
        for fn in functions.values():
            typer.echo(describe_program(fn, sample))
    raise typer.Exit(EXIT_OK)


# ----------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    as_json: _switch("--json", help="Print as JSON.") = False,
) -> None:
    """Print the resolved settings and where each came from (API keys are never shown)."""
    import json

    from sglrun.cli.config import load_settings

    with _usage_errors():
        settings = load_settings(config_file=config, profile=profile)
    if as_json:
        typer.echo(json.dumps(settings.masked(), indent=2, default=str))
    else:
        from sglrun.cli.display import format_settings

        typer.echo(format_settings(settings))
    raise typer.Exit(EXIT_OK)


def main() -> None:
    """The ``sglrun`` console script."""
    global _STANDALONE
    _STANDALONE = True
    app(prog_name="sglrun")
