"""(8) The embedded engine under ``sglrun batch``: generated tokens/s at default settings,
against the best a hand-written loop reaches on the same engine over a sweep of slot counts.

The hand loop builds an ``xllamacpp.Server`` with the same model, threads and per-slot context
as ``LlamaCpp()`` would, for each slot count, and keeps two requests per slot in flight from a
thread pool (``handle_completions`` with the prompt sglrun renders for the row). Both sides
start cold (``sglrun batch`` reports its own rate from its first row; engine start is not
timed on either side); nothing else runs meanwhile (llama.cpp's spinning threads slow each
other many-fold).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson

from bench.util import BIN, ROOT

if TYPE_CHECKING:
    from bench.run import Bench

TARGET = 0.9


def prompts(rows: list[dict[str, str]]) -> list[str]:
    """The prompt sglrun sends for each row (a dry run renders it with the model's template)."""
    from bench.generate import story

    return [story.trace(**row).text().split("{story}")[0] for row in rows]


def hand_loop(slots: int, threads: int, texts: list[str], tokens: int) -> float:
    """Generated tokens/s of a thread pool driving the engine directly."""
    import xllamacpp

    from sglrun.backends.llamacpp import CTX_PER_SLOT
    from sglrun.backends.model_path import resolve_model_path

    params = xllamacpp.CommonParams()
    params.model.path = str(resolve_model_path())
    params.n_parallel = slots
    params.n_ctx = slots * CTX_PER_SLOT
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_prompt = True
    params.verbosity = -1
    engines = [xllamacpp.Server(params)]
    body: dict[str, Any] = {
        "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True, "top_k": 0,
        "top_p": 1.0, "min_p": 0.0, "cache_prompt": True,
    }  # fmt: skip

    def one(text: str) -> int:
        answer = engines[0].handle_completions({**body, "prompt": text})
        return int(answer["usage"]["completion_tokens"])

    try:
        with ThreadPoolExecutor(2 * slots) as pool:  # cold, as the sglrun side is
            started = time.perf_counter()
            made = sum(pool.map(one, texts))
            return made / (time.perf_counter() - started)
    finally:
        engines.clear()  # the last reference: the engine stops and frees the model


def sglrun_batch(rows_path: str, tmp: str) -> tuple[float, str]:
    """Generated tokens/s ``sglrun batch`` reports at default settings (and its stderr)."""
    command = [os.path.join(BIN, "sglrun"), "batch", os.path.join("bench", "generate.py"),
               rows_path, "-o", os.path.join(tmp, "out.jsonl"), "-q", "--overwrite",
               "--no-cache"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    match = re.search(r"([\d.,]+) tok/s", done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"sglrun batch failed (exit {done.returncode}): {done.stderr[-300:]}")
    return float(match.group(1).replace(",", "")), done.stderr


def measure(bench: Bench) -> None:
    """Sweep the hand loop over slot counts (one round each), then alternate ``sglrun batch``
    and the hand loop at the best count: this machine's speed drifts by a third within
    minutes, so only figures taken side by side compare; the best round of each counts."""
    from bench.generate import TOKENS, make_rows
    from sglrun.backends.llamacpp import default_threads

    count = bench.s.engine_rows
    rows = make_rows(count)
    threads = default_threads()
    texts = prompts(rows)
    sweep = {slots: hand_loop(slots, threads, texts, TOKENS) for slots in bench.s.engine_slots}
    best_slots = max(sweep, key=lambda slots: sweep[slots])
    ours: list[float] = []
    hands: list[float] = [sweep[best_slots]]
    with tempfile.TemporaryDirectory(prefix="sglrun-bench-engine-") as tmp:
        rows_path = os.path.join(tmp, "rows.jsonl")
        with open(rows_path, "wb") as handle:
            handle.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))
        for round_ in range(bench.s.engine_rounds):
            ours.append(sglrun_batch(rows_path, tmp)[0])
            if round_:
                hands.append(hand_loop(best_slots, threads, texts, TOKENS))
    best, mine = max(hands), max(ours)
    row = bench.row("engine_sglrun", n=f"{count:,}")
    row.values = {"tokens_per_s": mine, "hand_tokens_per_s": best}
    row.result = (
        f"{mine:,.0f} generated tokens/s at default settings (rounds: "
        + ", ".join(f"{rate:,.0f}" for rate in ours)
        + ")"
    )
    shown = ", ".join(f"{slots} slots {rate:,.0f}" for slots, rate in sweep.items())
    row.reference = (
        f"hand loop {best:,.0f} tok/s at its best, {best_slots} slots (sweep: {shown}; rounds "
        + ", ".join(f"{rate:,.0f}" for rate in hands)
        + f"; {threads} threads)"
    )
    row.ratio = f"{mine / best:.2f}"
    row.target = f">= {TARGET}"
    row.status = "PASS" if mine >= TARGET * best else "FAIL"
    bench.log(f"    {row.measurement}: {row.result}; {row.reference}")
