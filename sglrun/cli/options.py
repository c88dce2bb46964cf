"""The flags ``run`` and ``batch`` share, declared once as typed annotations."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from sglrun.cli.config import Settings


BackendOpt = Annotated[
    Optional[str],
    typer.Option(
        "--backend",
        metavar="NAME",
        help="local (embedded llama.cpp, the default), sglang, openai or anthropic.",
    ),
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", metavar="NAME", help="GGUF path for local; the model for openai/anthropic."
    ),
]
UrlOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--url",
        metavar="URL",
        help="Server URL; repeat for several sglang servers [sglang: http://127.0.0.1:30000].",
    ),
]
ApiKeyEnvOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-key-env",
        metavar="NAME",
        help="Environment variable that holds the API key (the key is never printed).",
    ),
]
TemperatureOpt = Annotated[
    Optional[float],
    typer.Option("--temperature", metavar="T", help="Default temperature for gens."),
]
MaxTokensOpt = Annotated[
    Optional[int],
    typer.Option("--max-new-tokens", metavar="N", help="Default max tokens for gens."),
]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", metavar="P", help="Default top-p.")]
TopKOpt = Annotated[
    Optional[int], typer.Option("--top-k", metavar="K", help="Default top-k (-1 = off).")
]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option("--stop", metavar="TEXT", help="Default stop string (repeatable)."),
]
ThreadsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--concurrency",
        "--num-threads",
        metavar="auto|N",
        help="Programs (rows) in flight at once [auto: from the backend, e.g. 2 per engine slot].",
    ),
]
EngineThreadsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--engine-threads",
        metavar="auto|N",
        help="local: CPU threads computing the model [auto: the cores not busy at start].",
    ),
]
ReproducibleOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--reproducible",
        help="local: the same greedy text every run (1 slot, no prompt reuse).",
        show_default=False,
    ),
]
SlotsOpt = Annotated[
    Optional[int],
    typer.Option("--slots", metavar="N", help="local: sequences decoded together [16]."),
]
CtxSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--ctx-size", metavar="N", help="local: context tokens, all slots together [2048/slot]."
    ),
]
CacheOpt = Annotated[
    Optional[str],
    typer.Option(
        "--cache",
        metavar="[PATH]",
        help="Cache model calls: a rerun replays them [batch: on, in ~/.cache/sglrun; "
        "--cache alone: there; PATH: that file].",
    ),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the call cache.")
]
BatchApiOpt = Annotated[
    bool,
    typer.Option(
        "--batch-api",
        help="Run over the provider's batch API (openai, anthropic): half the price, "
        "answers within 24 h; each round of calls is one job.",
    ),
]
DetachOpt = Annotated[
    bool,
    typer.Option(
        "--detach", help="--batch-api: submit the next round and exit 75; run again to go on."
    ),
]
BatchStatusOpt = Annotated[
    bool, typer.Option("--status", help="--batch-api: show the run's jobs and exit.")
]
BatchPollOpt = Annotated[
    Optional[float],
    typer.Option(
        "--batch-poll",
        metavar="SECONDS",
        help="--batch-api: first wait between status checks; it doubles up to 60 [2].",
    ),
]
CacheModeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--cache-mode",
        metavar="use|refresh|off",
        help="refresh: send every call again (fresh samples) and store the answers [use].",
    ),
]
ConfigOpt = Annotated[
    Optional[str],
    typer.Option("--config", metavar="FILE", help="Settings file (replaces sglrun.yaml)."),
]
ProfileOpt = Annotated[
    Optional[str], typer.Option("--profile", metavar="NAME", help="Settings profile to use.")
]
FunctionOpt = Annotated[
    Optional[str],
    typer.Option("--function", metavar="NAME", help="The @function, if there are several."),
]
QuietOpt = Annotated[
    bool, typer.Option("-q", "--quiet", help="No progress display; the summary line only.")
]
VerboseOpt = Annotated[
    bool, typer.Option("-v", "--verbose", help="Log what sglrun does (INFO) to stderr.")
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Do not verify TLS certificates of server backends.")
]
RayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--ray",
        metavar="[auto|local|ADDRESS]",
        help="Run on a Ray cluster (pip install 'sglrun[ray]'): local starts one here, auto "
        "joins the running one; -o is then a directory of part files [ray.address, else local].",
    ),
]
ProgramArg = Annotated[
    str, typer.Argument(metavar="PROGRAM", help="Python file with a @sglrun.function.")
]


@dataclasses.dataclass
class SharedFlags:
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
    concurrency: str | None = None
    engine_threads: str | None = None
    slots: int | None = None
    ctx_size: int | None = None
    reproducible: bool | None = None
    cache: str | None = None  # "" when --cache came without a path
    no_cache: bool = False
    cache_mode: str | None = None
    config: str | None = None
    profile: str | None = None
    quiet: bool = False
    verbose: bool = False
    insecure: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SharedFlags:
        """The shared flags out of a command's parsed parameters (click's ``ctx.params``)."""
        return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls) if f.name in params})

    def settings(self) -> tuple[Settings, str]:
        """Flags > env > project file > user file, and the backend name."""
        from sglrun.cli.loader import resolve_settings

        keys = ("backend", "model", "api_key_env", "temperature", "max_new_tokens", "top_p")
        engine = ("engine_threads", "slots", "ctx_size", "reproducible")
        flags = {key: getattr(self, key) for key in (*keys, "top_k", "concurrency", *engine)}
        flags.update(url=self.url or None, stop=self.stop or None)  # [] = not given
        cache: bool | str | None = True if self.cache == "" else self.cache
        flags.update(cache=False if self.no_cache else cache, cache_mode=self.cache_mode)
        return resolve_settings(flags, config_file=self.config, profile=self.profile)


def bare_flags(args: list[str]) -> list[str]:
    """``--cache`` or ``--ray`` with no value as ``--cache=`` / ``--ray=``: typer's click has
    no optional option values. A cache path follows as ``--cache PATH`` (anything not a
    flag); a Ray address as ``--ray auto``, ``--ray local`` or ``--ray HOST:PORT`` (a word
    with ``:``), so ``--ray data.jsonl`` leaves the input alone. A program's own arguments
    after ``--`` are left alone."""
    out = list(args)
    end = out.index("--") if "--" in out else len(out)
    for index in range(end):
        following = out[index + 1] if index + 1 < end else None
        if out[index] == "--cache" and (following is None or following.startswith("-")):
            out[index] = "--cache="
        elif out[index] == "--ray" and not _ray_address(following):
            out[index] = "--ray="
    return out


def _ray_address(word: str | None) -> bool:
    if word is None or word.startswith("-"):
        return False
    return word in ("auto", "local") or (":" in word and not os.path.exists(word))
