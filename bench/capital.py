"""(5) ``programs/capital_fact.py`` on the embedded engine: sglrun vs a hand-written loop.

sglrun side: ``capital_fact.run_batch(rows, backend=LlamaCpp())``. Hand side: the same
xllamacpp engine (built with the parameters ``LlamaCpp`` built its own with) driven by a thread
pool, each thread sending a row's two completions in turn through
``xllamacpp.Server.handle_completions``, with the same prompts, temperature 0, max tokens and
stop. Both engines run side by side (one idles while the other is timed); engine start-up
and one warm-up batch per side are left out of the timings.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "programs", "capital_fact.py")
DATA = os.path.join(ROOT, "sample_data", "capital_fact.jsonl")
# Warm-up rows, the same for both sides: one per engine slot, so every slot has run once.
WARMUP_COUNTRIES = ("Portugal", "Kenya", "Chile", "Norway", "Vietnam", "Morocco", "Peru", "Finland")
# What capital_fact's gens ask for (temperature 0, stop at the newline), in llama.cpp's terms.
SAMPLING = {"temperature": 0.0, "stop": ["\n"], "cache_prompt": True}


def load_program() -> Any:
    spec = importlib.util.spec_from_file_location("_bench_capital_fact", PROGRAM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_rows(count: int) -> list[dict[str, str]]:
    with open(DATA, "rb") as handle:
        rows = [orjson.loads(line) for line in handle if line.strip()]
    if count > len(rows):
        raise ValueError(f"{DATA} has {len(rows)} rows, {count} asked")
    return [{"country": row["country"]} for row in rows[:count]]


def engine_params(backend: Any) -> Any:
    """``xllamacpp.CommonParams`` for an engine like the one ``backend`` (a ``LlamaCpp``) runs:
    the same model file, slots, context, threads and prompt cache."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(backend.model_path)
    params.n_parallel = backend.n_parallel
    params.n_ctx = backend.n_ctx
    params.cpuparams.n_threads = backend.n_threads
    params.cpuparams_batch.n_threads = backend.n_threads
    params.cache_prompt = True
    params.cache_ram_mib = 1024
    params.verbosity = -1
    return params


def hand_loop(server: Any, module: Any, rows: list[dict[str, str]], threads: int) -> list[Any]:
    """Two completions per row, as capital_fact sends them, from a pool of threads."""
    examples = module.EXAMPLES

    def one(row: dict[str, str]) -> tuple[str, str]:
        prompt = examples + "Country: " + row["country"] + "\n" + "Capital:"
        answer = server.handle_completions({**SAMPLING, "prompt": prompt, "max_tokens": 8})
        capital = answer["choices"][0]["text"]
        prompt += capital + "\nFact:"
        answer = server.handle_completions({**SAMPLING, "prompt": prompt, "max_tokens": 24})
        return capital, answer["choices"][0]["text"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, rows))


def compare(
    count: int, threads: int, log: Callable[[str], None], rounds: int = 2, warm: int = 8
) -> dict[str, Any]:
    """Both sides on engines started the same way and warmed the same way, timed in
    alternating rounds; the best round of each side counts (noise only ever adds time)."""
    import xllamacpp

    import sglrun as sgl

    module = load_program()
    program = module.capital_fact
    rows = load_rows(count)
    warm_rows = [{"country": country} for country in WARMUP_COUNTRIES[:warm]]

    started = time.perf_counter()
    backend = sgl.LlamaCpp()
    engine = [xllamacpp.Server(engine_params(backend))]  # cleared at the end: frees it
    start_s = time.perf_counter() - started
    outputs: dict[str, list[Any]] = {}

    def run_sglrun() -> None:
        states = program.run_batch(rows, backend=backend, num_threads=threads)
        failures = [state.error() for state in states if state.error() is not None]
        if failures:
            raise RuntimeError(f"{len(failures)} capital_fact rows failed: {failures[0]}")
        outputs["sglrun"] = [(state["capital"], state["fact"]) for state in states]

    def run_hand() -> None:
        outputs["hand"] = hand_loop(engine[0], module, rows, threads)

    try:
        started = time.perf_counter()
        program.run_batch(warm_rows, backend=backend, num_threads=threads)
        hand_loop(engine[0], module, warm_rows, threads)
        warm_s = time.perf_counter() - started
        log(f"    engines started in {start_s:.1f} s, warmed in {warm_s:.1f} s")
        times: dict[str, list[float]] = {"sglrun": [], "hand": []}
        sides = [("sglrun", run_sglrun), ("hand", run_hand)]
        for index in range(rounds):
            for name, func in sides if index % 2 == 0 else sides[::-1]:
                started = time.perf_counter()
                func()
                times[name].append(time.perf_counter() - started)
                log(f"    round {index + 1}: {name} {times[name][-1]:.2f} s for {count} rows")
    finally:
        backend.shutdown()
        engine.clear()
    sglrun_s, hand_s = min(times["sglrun"]), min(times["hand"])
    same = sum(1 for a, b in zip(outputs["sglrun"], outputs["hand"]) if tuple(a) == tuple(b))
    return {
        "sglrun_s": sglrun_s,
        "sglrun_pps": count / sglrun_s,
        "sglrun_total_s": sum(times["sglrun"]),
        "sglrun_rounds": times["sglrun"],
        "hand_s": hand_s,
        "hand_pps": count / hand_s,
        "hand_total_s": sum(times["hand"]),
        "hand_rounds": times["hand"],
        "hand_detail": (
            f"{threads} threads; engine n_parallel={backend.n_parallel}, n_ctx={backend.n_ctx}, "
            f"n_threads={backend.n_threads}"
        ),
        "setup_s": start_s + warm_s,
        "same_outputs": same,
    }
