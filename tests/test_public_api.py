"""The public surface: ``import sglrun`` stays light and every name in ``__all__`` exists."""

from __future__ import annotations

import subprocess
import sys

import sglrun


def test_import_sglrun_loads_no_rich_and_no_engine():
    probe = (
        "import sys, sglrun\n"
        "heavy = ('rich', 'xllamacpp', 'orjson', 'yaml', 'typer')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_name_in_all_exists():
    missing = []
    for name in sglrun.__all__:
        try:
            getattr(sglrun, name)
        except (AttributeError, ImportError) as exc:  # a lazy backend module may be absent
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    assert missing == []


def test_all_has_no_duplicates_and_names_the_core_api():
    assert len(set(sglrun.__all__)) == len(sglrun.__all__)
    for name in ("function", "gen", "select", "user", "assistant", "system", "RuntimeEndpoint"):
        assert name in sglrun.__all__


def test_run_batch_progress_bar_uses_the_display(capsys):
    from sglrun.backends.fake import FakeBackend

    @sglrun.function
    def echo(s, word: str):
        s += word + sglrun.gen("out", max_tokens=4)

    states = echo.run_batch(
        [{"word": "a"}, {"word": "b"}], backend=FakeBackend(["x"], cycle=True), progress_bar=True
    )
    assert [state["out"] for state in states] == ["x", "x"]
    assert "2 rows, 0 failed" in capsys.readouterr().err


def test_the_ray_package_names_run_dataset_and_loads_ray_only_when_it_runs():
    probe = (
        "import sys, sglrun.ray\n"
        "print(sglrun.ray.__all__, callable(sglrun.ray.run_dataset),\n"
        "      sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['run_dataset'] True []"
