"""``import sglang`` for programs written against SGLang: ``sglrun.install_sglang_alias()``.

After the call, ``import sglang as sgl`` gives sglrun's API, and the module paths programs
import from (``sglang.lang.ir``, ``sglang.lang.interpreter``, ``sglang.lang.chat_template``,
``sglang.lang.backend.base_backend``, ``sglang.global_config``, ``sglang.utils``,
``sglang.srt.constrained`` ...) give sglrun's modules of the same meaning: the same objects,
never copies, so ``isinstance`` checks and ``global_config`` settings hold across both names
(``sglang`` itself is a thin module reading through to ``sglrun``).
An alias finder goes first on ``sys.meta_path``, so it shadows an installed ``sglang``; names
it does not know fail to import as usual.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__all__ = ["ALIASES", "install_sglang_alias", "uninstall_sglang_alias"]

ALIASES: dict[str, str] = {
    "sglang": "sglrun",
    "sglang.api": "sglrun.lang.api",
    "sglang.global_config": "sglrun.lang.global_config",
    "sglang.lang": "sglrun.lang",
    "sglang.lang.api": "sglrun.lang.api",
    "sglang.lang.ir": "sglrun.lang.ir",
    "sglang.lang.interpreter": "sglrun.lang.interpreter",
    "sglang.lang.chat_template": "sglrun.lang.chat_template",
    "sglang.lang.choices": "sglrun.lang.choices",
    "sglang.lang.global_config": "sglrun.lang.global_config",
    "sglang.lang.tracer": "sglrun.lang.tracing",
    "sglang.lang.backend": "sglrun.backends",
    "sglang.lang.backend.base_backend": "sglrun.lang.base_backend",
    "sglang.lang.backend.runtime_endpoint": "sglrun.backends.runtime_endpoint",
    "sglang.lang.backend.openai": "sglrun.backends.openai",
    "sglang.lang.backend.anthropic": "sglrun.backends.anthropic",
    "sglang.utils": "sglrun.compat.utils",
    "sglang.srt": "sglrun.compat",
    "sglang.srt.constrained": "sglrun.compat.constrained",
    "sglang.srt.constrained.outlines_backend": "sglrun.compat.constrained",
}
"""Each ``sglang`` module path and the sglrun module that stands for it."""


class _AliasPackage(ModuleType):
    """``sglang``, ``sglang.lang``, ...: a module of its own that reads through to the sglrun
    module it stands for. The import system sets each imported child on its parent; here
    that lands on this module, never on sglrun's (where ``sglang.global_config``, the module,
    would replace the ``global_config`` object, as would ``sglang.lang.backend``)."""

    def __init__(self, name: str, target: ModuleType) -> None:
        super().__init__(name, target.__doc__)
        self.__dict__["_sglrun_target"] = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_sglrun_target"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        target = self.__dict__["_sglrun_target"]
        own = getattr(target, name, None) if name in dir(target) else None
        if isinstance(value, ModuleType) and own is not None and not isinstance(own, ModuleType):
            return  # a child module never hides the object of the same name (global_config)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        target = self.__dict__["_sglrun_target"]
        return sorted(
            set(super().__dir__()) | set(dir(target)) | set(getattr(target, "__all__", ()))
        )


class _AliasLoader(importlib.abc.Loader):
    """A parent alias gets an ``_AliasPackage``; a leaf gets sglrun's module itself, with the
    import system's bookkeeping on it (``__spec__``, a ``__path__``) undone, so under its
    own name nothing changed."""

    def __init__(self, fullname: str, target: str) -> None:
        self.fullname = fullname
        self.target = target
        self._saved: tuple[Any, bool] | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        if any(alias.startswith(self.fullname + ".") for alias in ALIASES):
            return _AliasPackage(self.fullname, module)
        self._saved = (module.__spec__, hasattr(module, "__path__"))
        return module

    def exec_module(self, module: ModuleType) -> None:
        if self._saved is None:
            return
        spec, had_path = self._saved
        module.__spec__ = spec
        if not had_path and "__path__" in module.__dict__:
            del module.__path__


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        module = ALIASES.get(fullname)
        if module is None:
            return None
        loader = _AliasLoader(fullname, module)
        return importlib.machinery.ModuleSpec(fullname, loader, is_package=True)


_FINDER = _AliasFinder()


def install_sglang_alias() -> None:
    """Make ``import sglang`` (and its module paths in ``ALIASES``) give sglrun. Idempotent;
    a ``sglang`` already imported for real is left alone and named in the error."""
    loaded = sys.modules.get("sglang")
    if loaded is not None and not isinstance(loaded, _AliasPackage):
        from sglrun.errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"the real sglang is already imported (from {getattr(loaded, '__file__', '?')}); "
            "call sglrun.install_sglang_alias() before anything imports sglang"
        )
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall_sglang_alias() -> None:
    """Undo ``install_sglang_alias`` (tests): the finder and the aliased module names go."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for name in ALIASES:
        sys.modules.pop(name, None)
