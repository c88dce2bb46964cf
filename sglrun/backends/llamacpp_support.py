"""Helpers of the embedded llama.cpp backend: where generation must stop, and logprob shapes.

``StopWatcher`` follows a streamed generation and decides, on the client side, where it ends:
at the first stop string, ``stop_regex`` match or stop token, whichever comes first in the
text. It also says how much of the text is safe to stream: text that could still turn out to
be part of a stop string (a partial match at the end) or of a stop-regex match is held back,
so a caller never receives text that the final result cuts off.

``ForcedScoring`` measures the model's log-probabilities of known tokens (``select`` choices,
prompt tokens) by forcing them with a token grammar.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sglrun.backends.grammar import token_grammar
from sglrun.errors import BackendError, InvalidArgumentError

try:  # Python 3.11+
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "CTX_PER_SLOT",
    "DEFAULT_SLOTS",
    "GREEDY",
    "ForcedScoring",
    "StopWatcher",
    "check_int",
    "check_number",
    "default_threads",
    "limit_openmp_spin",
    "logprob_entry",
    "top_entries",
]

DEFAULT_SLOTS = 16  # best tokens/s here: 16-32 slots, 153-168 vs 134 at 8 (make bench, part 8)
CTX_PER_SLOT = 2048  # tokens of context each slot gets unless n_ctx says otherwise


def _busy_cores(seconds: float = 0.1) -> float:
    """Cores busy with other work right now (Linux ``/proc/stat`` over ``seconds``)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = os.cpu_count() or 1
    span = total1 - total0
    return cores * (1 - (idle1 - idle0) / span) if span > 0 else 0.0


def default_threads() -> int:
    """Compute threads for the engine: the cores this process may use, less those busy with
    other work now. llama.cpp's threads spin while they wait: on a machine with other work,
    one thread too many made a run 4-36x slower (measured here), one too few costs ~2x."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = cores or os.cpu_count() or 1
    return max(1, cores - int(_busy_cores() + 0.5))


#: Spins an idle llama.cpp thread makes before it sleeps (libgomp's ``GOMP_SPINCOUNT``).
OPENMP_SPINCOUNT = "1000"


def limit_openmp_spin() -> None:
    """Bound how long the engine's idle threads busy-wait; call before xllamacpp loads.

    llama.cpp's CPU backend is built on OpenMP here, and its threads meet at a barrier after
    every operation of every token. libgomp waits there spinning (300,000 spins by default),
    as if each thread had a core to itself. Once other work takes a core after the engine
    started with ``default_threads()`` (another engine, a test run), a waiting thread spins
    out its time slice while the thread it waits for cannot run: with a second engine busy,
    the same ~120-token generation, with or without a regex, took 6x longer at p50 and up
    to 60x (over 110 s) instead of 1.9 s. At 1,000 spins a waiting thread soon sleeps and
    gives the core back: 3x at p50, 3.7x at worst (30 tries each, measured here). On an idle
    machine it costs about 5% at p50. (libgomp itself drops to 100 spins only when it sees
    more threads than cores, which other processes' load does not show it.)

    A value the user set (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) is kept. libgomp reads
    it once, when it is first loaded, so this does nothing if another library loaded it."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT


#: Characters held back while streaming with a stop regex whose matches have no length bound.
UNBOUNDED_REGEX_HOLDBACK = 256


def _regex_holdback(pattern: str) -> int:
    """How many trailing characters a new match of ``pattern`` can reach back over."""
    try:
        _low, high = _sre_parse.parse(pattern).getwidth()
    except Exception:  # the pattern compiled already; be conservative
        return UNBOUNDED_REGEX_HOLDBACK
    return max(0, min(high, UNBOUNDED_REGEX_HOLDBACK) - 1)


class StopWatcher:
    """Accumulates streamed text and finds the first stop condition in it."""

    def __init__(
        self,
        stop: Sequence[str] = (),
        stop_regex: Sequence[str] = (),
        stop_token_ids: Iterable[int] = (),
    ) -> None:
        self.stops = [s for s in stop if s]
        self.regexes: list[re.Pattern[str]] = []
        for pattern in stop_regex:
            try:
                self.regexes.append(re.compile(pattern))
            except (re.error, TypeError) as exc:
                raise InvalidArgumentError(f"invalid stop_regex {pattern!r}: {exc}") from None
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        self._regex_holdback = max((_regex_holdback(r.pattern) for r in self.regexes), default=0)
        self.text = ""
        self.cut: int | None = None
        self.matched: str | int | None = None
        self.emitted = 0

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    @property
    def active(self) -> bool:
        """True when there is any stop condition to watch for."""
        return bool(self.stops or self.regexes or self.stop_token_ids)

    @property
    def needs_token_ids(self) -> bool:
        return bool(self.stop_token_ids)

    def feed(self, piece: str, tokens: Sequence[tuple[int, bytes]] = ()) -> bool:
        """Add one streamed piece (and the tokens that made it). True once a stop was found."""
        if self.stopped:
            return True
        start = len(self.text)
        self.text += piece
        candidates: list[tuple[int, str | int]] = []
        if self.stop_token_ids and tokens:
            offset = b""
            for token_id, raw in tokens:
                if token_id in self.stop_token_ids:
                    where = start + len(offset.decode("utf-8", errors="ignore"))
                    candidates.append((min(where, len(self.text)), token_id))
                    break
                offset += raw
        if self.stops:
            window = max(0, start - self._longest_stop + 1)
            for stop in self.stops:
                found = self.text.find(stop, window)
                if found >= 0:
                    candidates.append((found, stop))
        for regex in self.regexes:
            match = regex.search(self.text)
            if match is not None:
                candidates.append((match.start(), regex.pattern))
        if candidates:
            # The earliest cut wins; on a tie keep the first-listed condition (stable sort).
            where, matched = min(candidates, key=lambda c: c[0])
            # Text already streamed is never taken back (only an unbounded stop regex
            # matching far behind the stream could ask for that).
            self.cut = max(where, self.emitted)
            self.matched = matched
            return True
        return False

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:size]):
                    best = size
                    break
        return best

    def take_safe(self, final: bool = False) -> str:
        """The next piece that can be streamed; everything left when ``final``."""
        if self.cut is not None:
            end = self.cut
        elif final:
            end = len(self.text)
        else:
            hold = max(self._partial_stop_len(), self._regex_holdback)
            end = len(self.text) - hold
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]


Piece = Callable[[int], str]


def _token_text(entry: dict[str, Any], piece: Piece | None) -> str:
    raw = entry.get("bytes")
    text = bytes(raw).decode("utf-8", errors="replace") if raw else str(entry.get("token") or "")
    if not text and piece is not None:  # special tokens come back empty: name them
        text = piece(int(entry.get("id", -1)))
    return text


def logprob_entry(
    entry: dict[str, Any], with_text: bool, piece: Piece | None = None
) -> tuple[float | None, int, str | None]:
    """One llama.cpp logprob record as SGLang's ``(logprob, token_id, text or None)``."""
    value = entry.get("logprob")
    return (
        float(value) if value is not None else None,
        int(entry.get("id", -1)),
        _token_text(entry, piece) if with_text else None,
    )


def top_entries(
    entry: dict[str, Any], count: int, with_text: bool, piece: Piece | None = None
) -> list[tuple[float | None, int, str | None]]:
    """The ``count`` most likely tokens at one position, SGLang-shaped."""
    if count <= 0:
        return []
    tops = (entry.get("top_logprobs") or [])[:count]
    return [logprob_entry(top, with_text, piece) for top in tops]


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, not {value}")
    return value


def check_number(name: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number, not {type(value).__name__}")
    return float(value)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP on this thread (delivered when the block ends)."""
    held = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class EngineGate:
    """Counts the threads inside the engine, so that it is freed only when none is.

    Freeing llama.cpp's server while a thread is in ``handle_completions`` (or about to run a
    token callback) crashes the process, and so does a thread coming back from the engine
    after the interpreter began to finalize: Python 3.11 ends it with ``pthread_exit``, whose
    unwinding the engine's C++ ``catch (...)`` blocks cannot pass ("FATAL: exception not
    rethrown", then abort). ``close`` therefore refuses new calls, makes streaming calls stop
    at their next token (``closing``), and waits for the rest."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._inside = 0
        self.closing = False

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with self._changed:
            if self.closing:
                raise BackendError("the embedded llama.cpp engine was shut down")
            self._inside += 1
        try:
            yield
        finally:
            with self._changed:
                self._inside -= 1
                self._changed.notify_all()

    @property
    def inside(self) -> int:
        return self._inside

    def close(self, timeout: float | None) -> bool:
        """Refuse new calls and wait up to ``timeout`` s for those inside; True once none
        is."""
        with self._changed:
            self.closing = True
            return self._changed.wait_for(lambda: self._inside == 0, timeout)


GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
Logprob = tuple[Any, int, Any]


class ForcedScoring:
    """Log-probabilities measured by forcing known tokens: a token grammar admits only them,
    and at temperature 0 the engine reports the model's own (unconstrained) logprob of each.
    This scores ``select`` choices and prompt tokens. It is given what it uses of the engine:
    ``completions(body, on_event=None)`` (llama.cpp's completion handler), ``complete(body)``
    (one checked call), ``tokenize(text)`` and ``piece(token)`` (a token's text)."""

    def __init__(
        self,
        *,
        completions: Callable[..., Any],
        complete: Callable[[dict[str, Any]], dict[str, Any]],
        tokenize: Callable[..., list[int]],
        piece: Callable[[int], str],
    ) -> None:
        self._completions = completions
        self._complete = complete
        self.tokenize = tokenize
        self._piece = piece

    def _force(self, context: Sequence[int], forced: Sequence[int], top_n: int = 1) -> list[dict]:
        """The model's own logprob record of each ``forced`` token following ``context``."""
        records: list[dict[str, Any]] = []
        while len(records) < len(forced):
            prompt = [*context, *forced[: len(records)]]
            got = self._forced_run(prompt, list(forced[len(records) :]), top_n)
            if not got:  # a grammar cannot produce an end-of-generation token: bias it in
                got = self._forced_one(prompt, int(forced[len(records)]), top_n)
            records.extend(got)
        return records

    def _forced_run(self, prompt: list[int], tokens: list[int], top_n: int) -> list[dict]:
        """As many of ``tokens`` as a token grammar yields, in one streamed call. It stops
        early (the engine reports an error) where a token would end the generation."""
        records: list[dict[str, Any]] = []

        def on_event(event: dict[str, Any]) -> bool:
            if not event.get("choices"):
                return "error" in event or "message" in event
            for record in (event["choices"][0].get("logprobs") or {}).get("content") or []:
                if len(records) == len(tokens) or int(record.get("id", -1)) != tokens[len(records)]:
                    return True
                records.append(record)
            return len(records) == len(tokens)

        body = dict(GREEDY, prompt=prompt, max_tokens=len(tokens) + 1, stream=True)
        body.update(grammar=token_grammar(tokens), logprobs=max(1, top_n), cache_prompt=True)
        self._completions(body, on_event)
        return records

    def _forced_one(self, prompt: list[int], token: int, top_n: int) -> list[dict]:
        """One token forced by a logit bias (the reported logprob is the model's own)."""
        body = dict(GREEDY, prompt=prompt, max_tokens=1, logprobs=max(1, top_n))
        answer = self._complete(dict(body, logit_bias=[[token, 1000.0]], cache_prompt=True))
        content = (answer["choices"][0].get("logprobs") or {}).get("content") or []
        if not content or int(content[0].get("id", -1)) != token:
            raise BackendError(f"the engine could not be made to produce token {token}")
        return content[:1]

    def input_logprobs(
        self, prompt: str, start: int, top_n: int, with_text: bool
    ) -> tuple[list[Logprob], list[Any]]:
        """Prompt-token logprobs from ``logprob_start_len`` on; the first token has none."""
        ids = self.tokenize(prompt)
        start = min(start, len(ids))
        values: list[Logprob] = []
        tops: list[Any] = []
        if start == 0 and ids:
            text = self._piece(ids[0]) if with_text else None
            values.append((None, ids[0], text))
            tops.append(None)
            start = 1
        if start < len(ids):
            for record in self._force(ids[:start], ids[start:], top_n):
                values.append(logprob_entry(record, with_text, self._piece))
                tops.append(top_entries(record, top_n, with_text, self._piece))
        return values, tops

    def score_choice(self, prompt: str, prompt_ids: list[int], choice: str) -> list[Logprob]:
        """Logprobs of the choice's tokens after the prompt (tokenized together, as SGLang)."""
        full = self.tokenize(prompt + choice) if choice else list(prompt_ids)
        shared = 0
        while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
            shared += 1
        if shared == len(full):
            return []
        head: list[Logprob] = []
        if shared == 0:  # nothing before the choice: its first token has no logprob
            head, shared = [(None, full[0], self._piece(full[0]))], 1
        records = self._force(full[:shared], full[shared:]) if shared < len(full) else []
        return head + [logprob_entry(r, True, self._piece) for r in records]

    def score_alone(self, scored: list[Logprob]) -> list[Logprob]:
        """The same tokens with no prompt: the first has no logprob (as in SGLang)."""
        if not scored:
            return []
        ids = [int(token[1]) for token in scored]
        head: list[Logprob] = [(None, ids[0], scored[0][2])]
        forced = self._force(ids[:1], ids[1:])
        return head + [logprob_entry(r, True, self._piece) for r in forced]
