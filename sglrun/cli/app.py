"""The ``sglrun`` command line: ``batch``, ``run``, ``inspect`` and ``config show``.

Start-up stays fast (``sglrun --help`` well under 0.3 s): only typer is imported here; the
readers, writers, Rich, orjson and every backend are imported inside the commands that use
them. Errors before any row runs are one line on stderr and exit 2; stdout carries only data.

Exit codes: 0 every row ok, 1 some rows failed, 2 usage or input error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from sglrun.cli.batch_flags import (
    check_batch_flags,
    check_output,
    default_output,
    delimiter_flag,
    parse_include,
    parse_map,
    rendered_output,
)
from sglrun.cli.cache_cmd import cache_app
from sglrun.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    INVOCATION,
    PROCESS,
    one_line,
    say,
    setup_logging,
    usage_errors,
)
from sglrun.cli.options import (
    ApiKeyEnvOpt,
    BackendOpt,
    BatchApiOpt,
    BatchPollOpt,
    BatchStatusOpt,
    CacheModeOpt,
    CacheOpt,
    ConfigOpt,
    CtxSizeOpt,
    DetachOpt,
    EngineThreadsOpt,
    FunctionOpt,
    InsecureOpt,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
    ProfileOpt,
    ProgramArg,
    QuietOpt,
    RayOpt,
    ReproducibleOpt,
    SharedFlags,
    SlotsOpt,
    StopOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    UrlOpt,
    VerboseOpt,
    bare_flags,
)
from sglrun.cli.run_once import run_once
from sglrun.errors import InputError

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "app", "main"]


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

        args = bare_flags(list(sys.argv[1:] if args is None else args))
        INVOCATION[:] = args
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
                say(f"sglrun: error: {one_line(exc.format_message())}{where}")
        except typer.Abort:
            code = EXIT_INTERRUPTED
        except Exception as exc:  # a bug: one line; the traceback with -v or SGLRUN_TRACEBACK
            if os.environ.get("SGLRUN_TRACEBACK") or "-v" in args or "--verbose" in args:
                import traceback

                traceback.print_exc()
            say(f"sglrun: internal error: {type(exc).__name__}: {one_line(exc)}")
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
app.add_typer(cache_app, name="cache")


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


# ----------------------------------------------------------------------------- batch

BATCH_HELP = """Run PROGRAM on every row of INPUT and write one JSON record per row.

INPUT is a .jsonl, .csv or .tsv file (each may be .gz), or - for stdin. Row keys
(CSV columns) fill the function's parameters by name, converted by their annotations.

OUTPUT defaults to <input stem>.out.jsonl next to the input, or stdout when INPUT is -.
Each line is {"id": ..., "vars": {...}, "error": null | {"type": ..., "message": ...}}, plus
input/text/messages/meta with --include. Records are written (and flushed) as rows finish.

With --ray, several INPUTs (files, globs, directories, s3:// paths) run on a Ray cluster
into the directory -o OUTDIR: one part file per block, and a manifest.

Exit codes: 0 every row ok, 1 some rows failed, 2 usage or input error, 130 interrupted
(run the same command again with --resume to finish).
"""


@app.command(help=BATCH_HELP, no_args_is_help=True)
def batch(
    ctx: typer.Context,
    program: ProgramArg,
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT",
            help=".jsonl, .csv or .tsv (maybe .gz), or -; with --ray also .parquet, globs, "
            "directories and s3:// or gs:// paths.",
        ),
    ],
    output: Annotated[
        Optional[str],
        typer.Option(
            "-o",
            "--output",
            metavar="OUTPUT",
            help="A .jsonl, .jsonl.gz, .csv, .tsv or .parquet file, or - for stdout "
            "[default: <input stem>.out.jsonl, or stdout]; with --ray, a directory.",
        ),
    ] = None,  # fmt: skip
    function: FunctionOpt = None,
    maps: Annotated[
        Optional[list[str]],
        typer.Option("--map", metavar="PARAM=COLUMN", help="Fill PARAM from COLUMN (repeatable)."),
    ] = None,
    id_field: Annotated[
        Optional[str], typer.Option("--id-field", metavar="NAME", help="Row key used as the id.")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="A row key that is no parameter is an error.")
    ] = False,
    unordered: Annotated[
        bool, typer.Option("--unordered", help="Write records as rows finish.")
    ] = False,
    window: Annotated[
        Optional[int],
        typer.Option("--window", metavar="N", help="Records held back to keep order."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Append to OUTPUT, skipping ids already in it.")
    ] = False,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="Resume and run failed ids again.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUTPUT (once done).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Resume although the input or program changed: rerun changed rows."
        ),
    ] = False,
    row_timeout: Annotated[
        Optional[float],
        typer.Option(
            "--row-timeout",
            metavar="SECONDS",
            help="A row running longer is an error record, the batch goes on (0: none) [600].",
        ),
    ] = None,  # fmt: skip
    json_values: Annotated[
        bool,
        typer.Option(
            "--json-values", help="Write json_schema variables as JSON objects, not strings."
        ),
    ] = False,
    joblog: Annotated[
        Optional[str],
        typer.Option(
            "--joblog",
            metavar="FILE",
            help="Append a tab-separated line per row: id, start, runtime, status, attempts.",
        ),
    ] = None,  # fmt: skip
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print each row's first prompt as JSON, without a model; write nothing.",
        ),
    ] = False,
    max_failures: Annotated[
        Optional[int],
        typer.Option(
            "--max-failures",
            metavar="N",
            help="Stop taking rows after N failed rows (those done are kept; exit 1).",
        ),
    ] = None,  # fmt: skip
    include: Annotated[
        Optional[list[str]],
        typer.Option("--include", metavar="FIELDS", help="Add input,text,messages,meta."),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="Show the text of rows in flight (terminal).")
    ] = False,
    limit: Annotated[
        Optional[int], typer.Option("--limit", metavar="N", help="Only the first N rows.")
    ] = None,
    input_format: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="Input format jsonl|csv|tsv [from the suffix]; with --ray, the parts' "
            "format jsonl|parquet [jsonl].",
        ),
    ] = None,
    delimiter: Annotated[
        Optional[str],
        typer.Option(
            "--delimiter", metavar="CHAR", help="Field separator of CSV input [, or TAB for tsv]."
        ),
    ] = None,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    url: UrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    temperature: TemperatureOpt = None,
    max_new_tokens: MaxTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    stop: StopOpt = None,
    concurrency: ThreadsOpt = None,
    engine_threads: EngineThreadsOpt = None,
    slots: SlotsOpt = None,
    ctx_size: CtxSizeOpt = None,
    reproducible: ReproducibleOpt = None,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    cache_mode: CacheModeOpt = None,
    batch_api: BatchApiOpt = False,
    detach: DetachOpt = False,
    status: BatchStatusOpt = False,
    batch_poll: BatchPollOpt = None,
    ray: RayOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    insecure: InsecureOpt = False,
) -> None:
    shared = SharedFlags.from_params(ctx.params)
    setup_logging(verbose)
    from sglrun.batch.render import check_kind, output_kind
    from sglrun.cli.batch_api_cmd import BatchApiFlags, show_status
    from sglrun.cli.batch_job import BatchJob
    from sglrun.cli.loader import check_mapping, load_program

    with usage_errors():
        fields, input_columns = parse_include(include)
        check_batch_flags(ctx.params)
        mapping = parse_map(maps)
        settings, backend_name = shared.settings()
        fn = load_program(program, function)
        check_mapping(fn, mapping)
        if ray is not None:
            from sglrun.cli.ray_cmd import ray_batch

            ray_batch(ctx.params, fn, shared, settings, backend_name, fields, input_columns)
        if len(inputs) > 1:
            raise InputError(f"{len(inputs)} inputs: a local run reads one (or add --ray)")
        input_path = inputs[0]
        out = output if output is not None else default_output(input_path)
        batch_flags = BatchApiFlags(batch_api, detach, status, batch_poll)
        batch_flags.check(backend_name, out)
        if status:
            show_status(settings, backend_name, out, shared.insecure)
        resume = resume or batch_flags.continues(out)
        rendered = output_kind(out) if out != "-" else None
        if not dry_run:
            check_output(out, input_path)
            if out != "-":
                check_kind(out)
            if rendered is not None:
                out = rendered_output(out, input_path, program, overwrite or resume)
        job = BatchJob(
            fn, shared, settings, backend_name, input_path=input_path, out=out,
            input_format=input_format, id_field=id_field, mapping=mapping, strict=strict,
            ordered=not unordered, window=window, resume=resume or retry_errors,
            retry_errors=retry_errors, include=fields, stream=stream, limit=limit,
            overwrite=overwrite, force=force, program_path=program,
            row_timeout=row_timeout, max_failures=max_failures, joblog=joblog,
            delimiter=delimiter_flag(delimiter), input_columns=input_columns,
            json_values=json_values,
            rendered=(output, rendered) if rendered is not None and output else None,
            batch_api=batch_flags if batch_api else None,
        )  # fmt: skip
        if dry_run:
            from sglrun.cli.batch_job import dry_run_batch

            dry_run_batch(job)
        job.prepare()
    job.run()


# ----------------------------------------------------------------------------- run

RUN_HELP = """Run PROGRAM once and print what it generates.

Program parameters follow a -- as --name value (converted by their annotations), e.g.
sglrun run programs/summarize.py -- --text "...". The text streams to stdout as it is
generated, then the variables are printed as JSON; --json prints only the JSON.
"""


def _run_help(ctx: typer.Context, value: bool) -> None:
    """``run --help``; after a PROGRAM also its docstring and parameters."""
    if not value or ctx.resilient_parsing:
        return
    typer.echo(ctx.get_help())
    tokens = INVOCATION[INVOCATION.index("run") + 1 :] if "run" in INVOCATION else []
    programs = [t for t in tokens if t.endswith(".py") and os.path.isfile(t)]
    if programs:
        from sglrun.cli.loader import describe_parameters, find_functions, load_module

        with usage_errors():
            for fn in find_functions(load_module(programs[0])).values():
                typer.echo("\n" + describe_parameters(fn))
    raise typer.Exit(EXIT_OK)


@app.command(
    help=RUN_HELP,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    no_args_is_help=True,
    add_help_option=False,
)
def run(
    ctx: typer.Context,
    program: ProgramArg,
    show_help: Annotated[
        bool,
        typer.Option(
            "--help",
            "-h",
            is_eager=True,
            expose_value=False,
            callback=_run_help,
            help="Show this message (after PROGRAM: its parameters too) and exit.",
        ),
    ] = False,
    function: FunctionOpt = None,
    json_only: Annotated[
        bool, typer.Option("--json", help="Print only the variables, as JSON.")
    ] = False,
    backend: BackendOpt = None,
    model: ModelOpt = None,
    url: UrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    temperature: TemperatureOpt = None,
    max_new_tokens: MaxTokensOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    stop: StopOpt = None,
    concurrency: ThreadsOpt = None,
    engine_threads: EngineThreadsOpt = None,
    slots: SlotsOpt = None,
    ctx_size: CtxSizeOpt = None,
    reproducible: ReproducibleOpt = None,
    cache: CacheOpt = None,
    no_cache: NoCacheOpt = False,
    cache_mode: CacheModeOpt = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    insecure: InsecureOpt = False,
) -> None:
    shared = SharedFlags.from_params(ctx.params)
    setup_logging(verbose)
    from sglrun.cli.loader import build_backend, load_program, program_arguments

    with usage_errors():
        settings, backend_name = shared.settings()
        fn = load_program(program, function)
        arguments = program_arguments(fn, list(ctx.args))
        chosen = build_backend(settings, backend_name, insecure=insecure)
    run_once(fn, chosen, settings, arguments, json_only)


# ----------------------------------------------------------------------------- inspect


@app.command("inspect", no_args_is_help=True)
def inspect_command(
    program: ProgramArg,
    function: Annotated[
        Optional[str], typer.Option("--function", metavar="NAME", help="Only this @function.")
    ] = None,
    row: Annotated[
        Optional[str],
        typer.Option("--row", metavar="JSON", help='A sample row, e.g. \'{"text": "hi"}\'.'),
    ] = None,
) -> None:
    """List a program's functions, parameters and variables, and show the prompt a row makes
    (a dry run: no model is called; gens show as {name})."""
    import json

    from sglrun.cli.loader import describe_program, find_functions, load_module, load_program

    with usage_errors():
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
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Print the resolved settings and where each came from (API keys are never shown)."""
    import json

    from sglrun.cli.config import load_settings

    with usage_errors():
        settings = load_settings(config_file=config, profile=profile)
    if as_json:
        typer.echo(json.dumps(settings.masked(), indent=2, default=str))
    else:
        from sglrun.cli.display import format_settings

        typer.echo(format_settings(settings))
        if settings.backend == "local":
            from sglrun.cli.loader import describe_engine

            typer.echo(describe_engine(settings))
    raise typer.Exit(EXIT_OK)


def main() -> None:
    """The ``sglrun`` console script. The embedded engine is stopped in order before the
    interpreter finalizes; if a call in it cannot be stopped, the process ends without
    finalizing (its output is flushed first), because finalizing around a busy native engine
    is what crashes."""
    PROCESS.standalone = True
    code: int | str | None = 0
    try:
        app(prog_name="sglrun")
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # between typer's own handling and ours
        code = EXIT_INTERRUPTED
    engines = sys.modules.get("sglrun.backends.llamacpp")  # loaded only if one was made
    try:
        if engines is not None:
            _flush_streams()
            _arm_exit_watchdog(engines.CLOSE_TIMEOUT + 15)
        closed = engines is None or engines.close_live_engines()
        _ignore_signals()  # the work is done: a signal now must not kill the exit half-way
    except KeyboardInterrupt:  # Ctrl-C while waiting for the engine: leave at once
        _ignore_signals()
        closed, code = False, EXIT_INTERRUPTED
    if not closed:
        _flush_streams()
        os._exit(code if isinstance(code, int) else EXIT_FAILED)
    sys.exit(code)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _arm_exit_watchdog(seconds: float) -> None:
    """A last resort that needs no Python thread: if freeing the engine hangs inside native
    code (seen once in 240 interrupted runs), the process still ends, with exit code 1, after
    ``seconds`` (faulthandler's C watchdog; its thread dump goes to /dev/null). The output
    was flushed before."""
    import faulthandler

    sink = open(os.devnull, "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(seconds, exit=True, file=sink)


def _ignore_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from here on. Finalizing, Python puts the signals
    it handled back to their default action (a SIGTERM would kill the exit mid-way), but
    it leaves ignored ones ignored."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
