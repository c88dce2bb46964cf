"""(9) Constrained decoding on the embedded engine: is a regex generation as steady as an
unconstrained one of the same length?

One engine at default settings; tries alternate between a gen constrained by a regex of 3-8
sentences (about 100 tokens) and an unconstrained gen of the same length, each on a prompt of
its own (so neither reuses the other's cache), and each try is timed alone. The figures are
ms per generated token, p50 and p99 (the slowest of 30 here), so a try that stops early
weighs the same as one cut at max_tokens.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Bench

SENTENCES = r"([A-Z][a-z ,]{5,60}\. ){3,8}"
TOKENS = 120
TARGET = 1.5  # constrained p99 at most this many times unconstrained p99

TOPICS = ["a cat", "the sea", "a city", "winter", "a garden", "trains", "music", "bread"]


def _program(constrained: bool) -> Any:
    import sglrun as sgl

    @sgl.function
    def write(s, topic: str, index: int):
        s += sgl.user(f"Write a few sentences about {topic} (note {index}).")
        if constrained:
            s += sgl.assistant(sgl.gen("text", max_tokens=TOKENS, regex=SENTENCES))
        else:
            s += sgl.assistant(sgl.gen("text", max_tokens=TOKENS, ignore_eos=True))

    return write


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def measure(bench: Bench) -> None:
    import sglrun as sgl

    tries = bench.s.constrained_tries
    engine = sgl.LlamaCpp()
    programs = {True: _program(True), False: _program(False)}
    per_token: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {True: [], False: []}
    try:
        programs[True].run("a dog", -1, backend=engine, temperature=0)  # compile the grammar
        for index in range(tries):
            for constrained in (True, False):
                topic = TOPICS[index % len(TOPICS)]
                started = time.perf_counter()
                state = programs[constrained].run(topic, index, backend=engine, temperature=0)
                took = time.perf_counter() - started
                if state.error() is not None:
                    raise RuntimeError(f"try {index} failed: {state.error()}")
                made = int(state.get_meta_info("text")["completion_tokens"])
                per_token[constrained].append(1000 * took / max(made, 1))
                tokens[constrained].append(made)
    finally:
        engine.shutdown()
    fixed, free = per_token[True], per_token[False]
    row = bench.row("constrained", n=str(tries))
    row.values = {"p50": statistics.median(fixed), "p99": p99(fixed)}
    row.result = (
        f"{statistics.median(fixed):.1f} ms/token p50, {p99(fixed):.1f} p99 "
        f"(max {max(fixed):.1f}; {statistics.mean(tokens[True]):.0f} tokens a try)"
    )
    row.reference = (
        f"unconstrained, same length: {statistics.median(free):.1f} ms/token p50, "
        f"{p99(free):.1f} p99 (max {max(free):.1f}; {statistics.mean(tokens[False]):.0f} tokens)"
    )
    ratio = p99(fixed) / p99(free)
    row.ratio = f"{ratio:.2f}"
    row.target = f"p99 <= {TARGET}x unconstrained p99"
    row.status = "PASS" if ratio <= TARGET else "FAIL"
    bench.log(f"    {row.measurement}: {row.result}; {row.reference}")
