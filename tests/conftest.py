"""Every test gets its own user cache directory, so ``sglrun batch`` (whose call cache is on
by default) never reads the user's cache, nor an answer another test stored."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.delenv("SGLRUN_CACHE", raising=False)
