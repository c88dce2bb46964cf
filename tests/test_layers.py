"""The layers: ``cli -> ray -> batch -> compat -> backends -> lang -> errors``; no module imports
upward.

Every import in every module counts, the ones inside functions too (a lazy import is still a
dependency). ``sglrun/__init__.py`` wires the layers together and may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sglrun"
LAYERS = {"errors": 0, "lang": 1, "backends": 2, "compat": 3, "batch": 4, "ray": 4.5, "cli": 5}


def layer_of(module: str) -> int | None:
    """The layer of ``sglrun.<part>...`` (None: the package itself and its ``__main__``,
    which wire the layers together)."""
    parts = module.split(".")
    if parts[0] != "sglrun" or len(parts) == 1 or parts[1].startswith("__"):
        return None
    return LAYERS.get(parts[1])


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        found.append((name, path))
    return found


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return found


def test_every_module_belongs_to_a_layer():
    unplaced = [
        name
        for name, _ in modules()
        if name.count(".") and not name.split(".")[1].startswith("__") and layer_of(name) is None
    ]
    assert unplaced == [], f"modules outside the layers {list(LAYERS)}: {unplaced}"


@pytest.mark.parametrize("name,path", modules(), ids=[name for name, _ in modules()])
def test_no_import_runs_up_a_layer(name, path):
    own = layer_of(name)
    if own is None:
        return
    upward = [
        f"{path.name}:{line}: {target}"
        for line, target in imports(path, name)
        if (layer_of(target) or 0) > own
    ]
    assert upward == [], f"{name} (layer {own}) imports from a higher layer: {upward}"


def test_the_language_names_no_concrete_backend():
    for name, path in modules():
        if layer_of(name) != LAYERS["lang"]:
            continue
        for line, target in imports(path, name):
            assert not target.startswith(("sglrun.backends", "sglrun.cli", "sglrun.batch")), (
                f"{path}:{line} imports {target}"
            )
