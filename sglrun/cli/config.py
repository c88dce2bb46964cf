"""Settings from YAML files, named profiles, environment variables and command-line flags.

Precedence, highest first: flags > ``SGLRUN_*`` environment > ``./sglrun.yaml`` > the user file
``<app dir>/config.yaml`` > built-in defaults; ``--config FILE`` replaces both files. A profile
overlays the top-level values of the same file, so a project profile beats the project's top
level but not the environment. API keys are never read from files: ``api_key_env`` names the
environment variable that holds the key, and nothing here prints or stores the key itself.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sglrun.errors import ConfigError, InvalidArgumentError

__all__ = ["ALIASES", "KEYS", "Settings", "load_settings"]
KEYS = (
    "backend",
    "url",
    "model",
    "api_key_env",
    "temperature",
    "max_new_tokens",
    "top_p",
    "top_k",
    "stop",
    "concurrency",
    "timeout",
    "retries",
    "coalesce",
    "row_timeout",
    "engine_threads",
    "slots",
    "ctx_size",
    "reproducible",
    "cache",
    "cache_mode",
    "cache_max_size",
    "ray",
    "default_profile",
)
#: Old names still read (files, ``SGLRUN_*``, flags): ``num_threads`` meant rows in parallel.
ALIASES = {"num_threads": "concurrency"}
_SAMPLING = ("temperature", "max_new_tokens", "top_p", "top_k", "stop")
# Where the key usually lives when the configuration does not say.
_DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PROJECT_FILE = "sglrun.yaml"
USER_FILE = "config.yaml"


@dataclass
class Settings:
    """Resolved settings; the defaults here are the built-in defaults.

    ``sources`` maps every key to where its value came from (``default``, a file, a profile,
    ``env SGLRUN_X``, ``flag --x``), for ``sglrun config show`` and for error messages.
    """

    backend: str = "local"
    url: list[str] | None = None
    model: str | None = None
    api_key_env: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
    concurrency: int | str = "auto"  # programs (rows) in flight at once
    timeout: float = 600.0
    retries: int = 2
    coalesce: bool = True  # SGLang: requests made together travel as one list request
    row_timeout: float = 600.0  # seconds a batch row may run (0: no limit)
    # The embedded engine (backend local); None: chosen when it starts (see LlamaCpp).
    engine_threads: int | str = "auto"  # CPU threads computing the model
    slots: int | None = None  # sequences decoded together
    ctx_size: int | None = None  # context tokens, all slots together
    reproducible: bool = False  # one slot, no prompt reuse: same greedy text every run
    # The call cache: True (the user cache directory), a path, False; None: the command's
    # default (on for ``batch``, off for ``run``). Mode use|refresh|off; size in bytes.
    cache: bool | str | None = None
    cache_mode: str = "use"
    cache_max_size: int | None = None
    # ``--ray``: {address, workers: (min, max), cpus_per_worker, gpus_per_worker,
    # rows_per_block, num_cpus}, checked by ``_ray``.
    ray: dict[str, Any] | None = None
    default_profile: str | None = None
    profile: str | None = None
    files: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    api_key_present: bool = False

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The key itself, read from the environment only at the moment a backend needs it."""
        if self.api_key_env is None:
            return None
        return (os.environ if env is None else env).get(self.api_key_env) or None

    def sampling_params(self) -> dict[str, Any]:
        """The sampling defaults that are set, as keyword arguments for a program run."""
        values = {key: getattr(self, key) for key in _SAMPLING}
        return {key: value for key, value in values.items() if value is not None}

    def masked(self) -> dict[str, Any]:
        """Everything safe to print: the key's variable name and whether it is set, never it."""
        from sglrun.backends.http_support import mask_url

        shown: dict[str, Any] = {key: getattr(self, key) for key in KEYS}
        if shown.get("url"):  # a URL's own password is as secret as a key
            shown["url"] = [mask_url(url) for url in shown["url"]]
        shown["api_key"] = "set" if self.api_key_present else "not set"
        shown["profile"] = self.profile
        shown["files"] = list(self.files)
        shown["sources"] = dict(self.sources)
        return shown


class _Bad(Exception):
    """A value does not fit its key; carries what was expected."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("a non-empty string")
    return value


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _Bad("a string or a non-empty list of strings")


def _backend(value: Any) -> str:
    """A registered backend's name (``sglrun.lang.registry``)."""
    from sglrun.lang.registry import backend_names

    value = value.lower() if isinstance(value, str) else value
    if value not in backend_names(hidden=True):
        raise _Bad("one of " + ", ".join(backend_names()))
    return value


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise _Bad("the NAME of an environment variable (e.g. OPENAI_API_KEY), not the key")
    return value


def _number(low: float, high: float | None = None, *, open_low: bool = False) -> Any:
    bounds = f"{'>' if open_low else '>='} {low:g}" + (
        f" and <= {high:g}" if high is not None else ""
    )

    def check(value: Any) -> float:
        if not _is_number(value):
            raise _Bad(f"a number {bounds}")
        if value < low or (open_low and value == low) or (high is not None and value > high):
            raise _Bad(f"a number {bounds}")
        return float(value)

    return check


def _integer(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not _is_int(value) or value < low:
            raise _Bad(f"an integer >= {low}")
        return value

    return check


def _sampling(key: str) -> Callable[[Any], Any]:
    """A sampling default, checked by the language's own table (``lang/sampling.py``)."""
    from sglrun.lang.sampling import sampling_problem

    def check(value: Any) -> Any:
        problem = sampling_problem(key, value)
        if problem is not None:
            raise _Bad(problem)
        return float(value) if key in ("temperature", "top_p") else value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false")
    return value


def _cache(value: Any) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise _Bad("true, false or the path of the cache file")


def _cache_mode(value: Any) -> str:
    if value in ("use", "refresh", "off"):
        return str(value)
    raise _Bad("one of use, refresh, off")


def _size(value: Any) -> int:
    from sglrun.lang.call_cache import parse_size

    try:
        return parse_size(value)
    except InvalidArgumentError:
        raise _Bad("a size like 500MB or 2GB, or a number of bytes") from None


_RAY_PARTS = ("address", "workers", "cpus_per_worker", "gpus_per_worker", "rows_per_batch",
              "num_cpus")  # fmt: skip


def _workers(value: Any) -> tuple[int, int]:
    """``4``, ``"2..8"`` or ``[2, 8]``: the actor pool's size, fixed or autoscaled."""
    if _is_int(value) and value >= 1:
        return value, value
    parts = value.split("..") if isinstance(value, str) else value
    if isinstance(parts, (list, tuple)) and len(parts) == 2:
        try:
            low, high = (int(str(part).strip()) for part in parts)
        except ValueError:
            low = high = 0
        if 1 <= low <= high:
            return low, high
    raise _Bad('an integer >= 1 or a range "MIN..MAX"')


def _ray(value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value.strip():
        return {"address": value.strip()}
    if not isinstance(value, Mapping):
        raise _Bad("an address or a mapping of " + ", ".join(_RAY_PARTS))
    section: dict[str, Any] = {}
    for part, item in value.items():
        if part not in _RAY_PARTS:
            raise _Bad("a mapping of " + ", ".join(_RAY_PARTS) + f" (not {part!r})")
        if part == "address":
            section["address"] = _string(item)
        elif part == "workers":
            section["workers"] = _workers(item)
        elif part in ("cpus_per_worker", "gpus_per_worker"):
            least = 0 if part == "gpus_per_worker" else 0.01
            if isinstance(item, bool) or not isinstance(item, (int, float)) or item < least:
                raise _Bad(f"{part} as a number >= {least}")
            section[part] = float(item)
        else:
            if not _is_int(item) or item < 1:
                raise _Bad(f"{part} as an integer >= 1")
            section["rows_per_block" if part == "rows_per_batch" else part] = item
    return section


def _threads(value: Any) -> int | str:
    if value == "auto" or (_is_int(value) and value >= 1):
        return value
    raise _Bad('"auto" or an integer >= 1')


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "backend": _backend,
    "url": _string_list,
    "model": _string,
    "api_key_env": _env_name,
    "temperature": _sampling("temperature"),
    "max_new_tokens": _sampling("max_new_tokens"),
    "top_p": _sampling("top_p"),
    "top_k": _sampling("top_k"),
    "stop": _string_list,
    "concurrency": _threads,
    "timeout": _number(0, open_low=True),
    "retries": _integer(0),
    "coalesce": _boolean,
    "row_timeout": _number(0),
    "engine_threads": _threads,
    "slots": _integer(1),
    "ctx_size": _integer(256),
    "reproducible": _boolean,
    "cache": _cache,
    "cache_mode": _cache_mode,
    "cache_max_size": _size,
    "ray": _ray,
    "default_profile": _string,
}


def _shown(key: str, value: Any) -> str:
    if key == "api_key_env":  # whatever was put here might be the key itself
        return type(value).__name__
    from sglrun.backends.http_support import mask_url

    text = mask_url(repr(value))
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _check(key: str, value: Any, where: str) -> Any:
    try:
        return _CHECKS[key](value)
    except _Bad as bad:
        raise ConfigError(f"{where} must be {bad.expected}, got {_shown(key, value)}") from None


_BOOLEAN_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _from_text(key: str, text: str) -> Any:
    """An environment (or text flag) value in the type its key wants; checked afterwards."""
    text = text.strip()
    if key == "url":
        return [part.strip() for part in text.split(",") if part.strip()] or text
    if key == "stop" and text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            return text
    integers = ("max_new_tokens", "top_k", "retries", "slots", "ctx_size")
    if key in integers or (key in ("concurrency", "engine_threads") and text != "auto"):
        try:
            return int(text)
        except ValueError:
            return text
    if key in ("coalesce", "reproducible") and text.lower() in _BOOLEAN_TEXT:
        return _BOOLEAN_TEXT[text.lower()]
    if key == "cache":  # SGLRUN_CACHE=off, =on or =PATH
        words = {**_BOOLEAN_TEXT, "on": True, "off": False}
        return words.get(text.lower(), text)
    if key in ("temperature", "top_p", "timeout", "row_timeout"):
        try:
            return float(text)
        except ValueError:
            return text
    return text


@dataclass
class _FileLayer:
    label: str
    path: Path
    top: dict[str, Any]
    profiles: dict[str, dict[str, Any]]


def _unknown_key(where: str, key: Any, valid: tuple[str, ...]) -> ConfigError:
    name = str(key)
    if name == "api_key":
        hint = "keys are never read from files: set api_key_env to the variable's name"
    else:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(valid)
    return ConfigError(f"{where}: unknown key {name!r} ({hint})")


_CACHE_PARTS = {"path": "cache", "enabled": "cache", "mode": "cache_mode",
                "max_size": "cache_max_size"}  # fmt: skip


def _cache_section(value: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """``cache: {path: ..., enabled: ..., mode: ..., max_size: ...}`` as the flat keys."""
    values: dict[str, Any] = {}
    for part, item in value.items():
        if part not in _CACHE_PARTS:
            raise _unknown_key(f"{where}: cache", part, tuple(_CACHE_PARTS))
        key = _CACHE_PARTS[part]
        if part == "enabled" and not isinstance(item, bool):
            raise ConfigError(f"{where}: key 'cache.enabled' must be true or false")
        if part == "enabled" and (item is False or "cache" not in values):
            values[key] = item
        elif part != "enabled":
            values[key] = _check(key, item, f"{where}: key 'cache.{part}'")
    if value.get("enabled") is False:
        values["cache"] = False
    return values


def _section(data: Mapping[Any, Any], where: str, valid: tuple[str, ...]) -> dict[str, Any]:
    values = {}
    for written, value in data.items():
        if written == "cache" and isinstance(value, Mapping):
            values.update(_cache_section(value, where))
            continue
        key = ALIASES.get(written, written)
        if key not in valid:
            raise _unknown_key(where, key, valid)
        if key != "profiles":
            values[key] = _check(key, value, f"{where}: key {written!r}")
    return values


def _load_file(path: Path, label: str) -> _FileLayer:
    """Parse and check one YAML file; every error names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{path}: cannot read configuration ({reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    top = _section(data, str(path), (*KEYS, "profiles"))
    profiles_data = data.get("profiles") or {}
    if not isinstance(profiles_data, dict):
        raise ConfigError(f"{path}: 'profiles' must be a mapping of profile names to settings")
    profiles = {}
    inner = tuple(key for key in KEYS if key != "default_profile")
    for name, body in profiles_data.items():
        where = f"{path}: profiles.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: a profile must be a mapping of keys")
        profiles[str(name)] = _section(body, where, inner)
    return _FileLayer(label, path, top, profiles)


def _files(config_file: str | None, cwd: Path, user_dir: Path | None) -> list[_FileLayer]:
    """The file layers, lowest precedence first."""
    if config_file is not None:
        path = Path(config_file)
        path = path if path.is_absolute() else cwd / path
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        return [_load_file(path, "config file")]
    if user_dir is None:
        import typer  # only this lookup needs it; keeps `import sglrun.cli.config` light

        user_dir = Path(typer.get_app_dir("sglrun"))
    found = [(user_dir / USER_FILE, "user file"), (cwd / PROJECT_FILE, "project file")]
    return [_load_file(path, label) for path, label in found if path.is_file()]


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    values = {}
    names = [(key, key) for key in KEYS] + [(old, new) for old, new in ALIASES.items()]
    for name, key in names:
        var = f"SGLRUN_{name.upper()}"
        text = env.get(var)
        if key in values and text is not None:  # the current name wins over the old one
            continue
        if key == "default_profile" or text is None or not text.strip():
            continue
        where = f"environment variable {var}"
        values[key] = (_check(key, _from_text(key, text), where), f"env {var}")
    return values


def _old_names(key: str) -> list[str]:
    return [old for old, new in ALIASES.items() if new == key]


def _flag_values(flags: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    values = {}
    for key, value in flags.items():
        key = ALIASES.get(key, key)
        if key not in KEYS:
            raise InvalidArgumentError(f"unknown settings flag {key!r}; known: {', '.join(KEYS)}")
        if value is None:
            continue
        option = "/".join(
            "--" + name.replace("_", "-") for name in (key, *_old_names(key))
        )  # what the user may have typed
        if isinstance(value, str) and key not in ("backend", "model", "api_key_env"):
            value = _from_text(key, value)
        values[key] = (_check(key, value, f"command-line option {option}"), f"flag {option}")
    return values


def _pick_profile(
    profile: str | None, env: Mapping[str, str], layers: list[_FileLayer]
) -> str | None:
    name = profile or (env.get("SGLRUN_PROFILE") or "").strip() or None
    if name is None:
        for layer in reversed(layers):  # the highest file that names a default wins
            if "default_profile" in layer.top:
                name = layer.top["default_profile"]
                break
    if name is None:
        return None
    known = sorted({p for layer in layers for p in layer.profiles})
    if name not in known:
        listed = ", ".join(known) if known else "none are defined"
        files = ", ".join(str(layer.path) for layer in layers) or "no configuration file found"
        raise ConfigError(f"unknown profile {name!r}; profiles: {listed} ({files})")
    return name


def load_settings(
    *,
    flags: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    profile: str | None = None,
    env: Mapping[str, str] = os.environ,
    cwd: Path | None = None,
    user_dir: Path | None = None,
) -> Settings:
    """Resolve every setting by precedence; raises ConfigError naming the file/variable and key.

    ``flags`` holds command-line values by key (None = not given). ``cwd`` and ``user_dir``
    default to the working directory and typer's app directory for "sglrun".
    """
    layers = _files(config_file, cwd or Path.cwd(), user_dir)
    active = _pick_profile(profile, env, layers)
    chosen: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        for key, value in layer.top.items():
            chosen[key] = (value, f"{layer.label} {layer.path}")
        overlay = layer.profiles.get(active, {}) if active else {}
        for key, value in overlay.items():
            chosen[key] = (value, f"profile {active!r} in {layer.path}")
    chosen.update(_env_values(env))
    chosen.update(_flag_values(flags or {}))
    settings = Settings(**{key: value for key, (value, _) in chosen.items()})
    settings.sources = {key: chosen[key][1] if key in chosen else "default" for key in KEYS}
    if settings.api_key_env is None and settings.backend in _DEFAULT_KEY_ENV:
        settings.api_key_env = _DEFAULT_KEY_ENV[settings.backend]
        settings.sources["api_key_env"] = f"default for backend {settings.backend}"
    settings.profile = active
    settings.files = [str(layer.path) for layer in layers]
    settings.api_key_present = bool(settings.api_key_env and env.get(settings.api_key_env))
    return settings
