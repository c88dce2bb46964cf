"""The benchmark's report: the table and the method, written to BENCHMARKS.md."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Bench, Row


HEADER = ("Measurement", "Result", "Floor / reference / detail", "Ratio", "Target", "Pass",
          "Took")  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        took = f"{row.seconds:.1f} s" if row.seconds is not None else ""
        cells = (row.measurement, row.result, row.reference, row.ratio or "",
                 row.target or "—", row.status or "—", took)  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


METHOD = """\
## Method

- **Server.** `bench/server.py` is an instant loopback server speaking SGLang's native API
  (`/generate` with a str or list `text`, `max_new_tokens=0`, logprobs, `/get_model_info`, ...)
  and the OpenAI API. It is a bare asyncio protocol with orjson in its own process, so it does
  not share the client's GIL; its CPU time per program is in the detail column.
- **Reference program** (`bench/programs.py`): two `gen` (max_tokens=8, stop="\\n") and one
  two-way `select`: four `/generate` requests per program (select = one prefix request with
  `max_new_tokens=0`, then one list request scoring both choices): five `/generate` items.
  The server counts HTTP requests and items. Sent one by one that is 4 requests per program;
  `RuntimeEndpoint` coalesces requests that are made while others are in flight into list
  requests, so it sends fewer (the items per program stay 5).
- **(1)** `reference.run_batch(rows, backend=RuntimeEndpoint(url), num_threads="auto")` after a
  warm-up batch; programs/s is wall clock, CPU ms/program is `time.process_time()` of the
  client process (all threads). `run_batch` runs the programs as greenlets on one hub thread
  (`sglrun/lang/hub.py`): a program waiting for an answer parks, the hub gathers the waiting
  requests and a worker thread sends them as one list request while the hub runs others.
  The `coalesce=False` row sends every request alone (what
  `RuntimeEndpoint` also does once round trips exceed 50 ms, i.e. on a real model). (1b) is
  the same program on `FakeBackend`: the runtime's own cost, no HTTP.
- **(2)** The floor sends the same four request bodies per program by hand, in the same order,
  one program's requests one after the other, no coalescing and no language runtime: aiohttp
  (one loop, many tasks, keep-alive) and, for reference, a urllib3 keep-alive pool driven by
  threads. Ratio (1)/(2) is against the aiohttp floor.
- **(3)** `sglrun batch bench/programs.py rows.jsonl -o out.jsonl --backend sglang --url URL -q`
  as a child process; its peak RSS is the `ru_maxrss` that `os.wait4` returns for that one
  child. Growth per row is (peak at the largest size - peak at the smallest) / rows between.
  The whole run has a time budget (`--budget`, 1,000 s): the largest size shrinks to the rows the
  time left allows at the rate of the run before it, and a run still going when the budget ends is
  stopped, its peak RSS and records written so far counted (both say so in the table).
- **(4)** `bench/fork.py`: `fork(5)`, one gen per fork, join, one more gen; the server holds each
  answer 200 ms, so 0.4 s is the floor. Median of warm runs (the first run opens connections).
- **(5)** `programs/capital_fact.py` on `LlamaCpp()` (SmolLM2-135M, embedded) via `run_batch`,
  against a thread pool calling `xllamacpp.Server.handle_completions` on an engine built with
  the same parameters, with the same prompts, temperature 0, max tokens and stops. Both engines
  are started and warmed (one batch of 8 other rows each) before timing; the sides then run in
  alternating rounds and the best round of each counts.
- **(6)** Median wall time of fresh subprocesses.
- **(9)** `bench/constrained.py`: one `LlamaCpp()` at default settings; tries alternate between
  a gen constrained by a regex of 3-8 sentences and an unconstrained gen of the same length
  (`ignore_eos`), each on its own prompt, each timed alone; ms per generated token, p50 and
  p99 of 30 tries each (the grammar is compiled once before timing).
- **(10)** `bench/cache.py`: `sglrun batch` of the reference program (three calls a row) on
  the instant server, as a user runs it (wall time of the process, start-up included):
  `--no-cache`, then filling a new cache file, then again on that file (every call replayed).
  The floor is the same batch on the in-process fake backend with no cache: the runtime and
  the batch machinery without any model call, which no replay can beat. Bytes per call: the
  checkpointed database file over its entries. Then a fill and a rerun of 2,000 rows against
  the latency server (lognormal, median 50 ms, sigma 1). (3) runs with the cache on (a new
  file per size), as `sglrun batch` does by default; (7) and (8) with `--no-cache`.
"""


def render_markdown(bench: Bench, info: dict[str, str], total: float, argv: list[str]) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench" + (" " + " ".join(argv) if argv else "")
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` (`make bench`) on {now}; the whole run took {total:.0f} s.",
        "",
        f"- Machine: {info['cores']} cores, {info['cpu']}, {info['memory']} RAM, {info['os']}",
        f"- Python: {info['python']}; {info['packages']}",
        f"- Load: {info.get('load', 'unknown')}",
        "",
        table(bench.ordered_rows()),
        "",
    ]
    if bench.s.quick:
        bench.notes.insert(
            0,
            "QUICK smoke run: the sizes are too small for the figures or the "
            "targets to mean anything.",
        )
    if bench.notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in bench.notes] + [""]
    parts += ["Time per part: " + "; ".join(f"{n} {t:.0f} s" for n, t in bench.timings), ""]
    parts += [METHOD]
    return "\n".join(parts)
