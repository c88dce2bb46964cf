"""The compatibility suite: programs written as SGLang's examples and benchmarks write them,
run unchanged under ``import sglang`` (``sglrun.install_sglang_alias()``) on the embedded
SmolLM2 engine. The model is tiny: the tests assert the structure SGLang gives (variable
types, meta keys, fork shapes, stream chunks with meta), never world knowledge."""

from __future__ import annotations

import pytest

import sglrun

sglrun.install_sglang_alias()  # before the test modules' own `import sglang as sgl`


@pytest.fixture(scope="session")
def engine():
    """One embedded engine, the default backend of every program here (as a script's
    ``sgl.set_default_backend(...)`` would make it)."""
    import sglang as sgl

    backend = sgl.LlamaCpp(n_parallel=8)
    sgl.set_default_backend(backend)
    yield backend
    sgl.set_default_backend(None)
    backend.shutdown()
