"""The floor: the reference program's four requests sent by hand, with no language runtime.

Each "program" is the same conversation ``bench.programs.reference`` has with an SGLang server
(same bodies, same order, each request waiting for the one before): gen, gen, the select's
prefix request, the select's list request; the choice with the highest normalized prompt
logprob wins. Two transports:

* ``aiohttp_floor``: one event loop, ``concurrency`` tasks over a keep-alive connector;
* ``urllib3_floor``: ``threads`` threads over one urllib3 keep-alive pool (what sglrun's
  transport is built on), for reference.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bench.programs import INSTRUCTIONS

CHOICES = (" yes", " no")
_GEN_PARAMS = {
    "max_new_tokens": 8,
    "min_new_tokens": 0,
    "n": 1,
    "stop": ["\n"],
    "stop_token_ids": [],
    "stop_regex": [],
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "ignore_eos": False,
}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


@dataclass
class FloorResult:
    name: str
    programs: int
    seconds: float
    cpu_seconds: float
    requests: int
    verdicts: dict[str, int]

    @property
    def programs_per_s(self) -> float:
        return self.programs / self.seconds

    @property
    def cpu_ms_per_program(self) -> float:
        return 1000 * self.cpu_seconds / self.programs


def first_prompt(question: str) -> str:
    return INSTRUCTIONS + "Question: " + question + "\n" + "Answer:"


def gen_body(prompt: str) -> bytes:
    return orjson.dumps({"text": prompt, "sampling_params": _GEN_PARAMS})


def prefix_body(prompt: str) -> bytes:
    return orjson.dumps({"text": prompt, "sampling_params": {"max_new_tokens": 0}})


def score_body(prompt: str, prompt_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "text": [prompt + choice for choice in CHOICES],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": max(prompt_tokens - 2, 0),
        }
    )


def decide(answers: list[dict[str, Any]]) -> str:
    scores = [a["meta_info"]["normalized_prompt_logprob"] for a in answers]
    return CHOICES[max(range(len(scores)), key=scores.__getitem__)]


# ------------------------------------------------------------------------------ aiohttp
async def _aiohttp_run(url: str, questions: list[str], concurrency: int) -> dict[str, int]:
    import aiohttp

    verdicts: dict[str, int] = {}
    counter = itertools.count()
    total = len(questions)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout, headers=HEADERS
    ) as session:

        async def post(body: bytes) -> Any:
            async with session.post("/generate", data=body) as response:
                data = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"/generate answered {response.status}: {data[:200]!r}")
                return orjson.loads(data)

        async def worker() -> None:
            while True:
                index = next(counter)
                if index >= total:
                    return
                prompt = first_prompt(questions[index])
                answer = await post(gen_body(prompt))
                prompt += answer["text"] + "\nConfidence:"
                answer = await post(gen_body(prompt))
                prompt += answer["text"] + "\nNeeds checking:"
                prefix = await post(prefix_body(prompt))
                scored = await post(score_body(prompt, prefix["meta_info"]["prompt_tokens"]))
                verdict = decide(scored)
                verdicts[verdict] = verdicts.get(verdict, 0) + 1

        await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return verdicts


def aiohttp_floor(url: str, questions: list[str], concurrency: int = 64) -> FloorResult:
    cpu0, t0 = time.process_time(), time.perf_counter()
    verdicts = asyncio.run(_aiohttp_run(url, questions, concurrency))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    name = f"aiohttp, {concurrency} tasks"
    return FloorResult(name, len(questions), seconds, cpu, 4 * len(questions), verdicts)


# ------------------------------------------------------------------------------ urllib3
def urllib3_floor(url: str, questions: list[str], threads: int = 32) -> FloorResult:
    import urllib3

    pool = urllib3.PoolManager(maxsize=threads, block=True)
    target = url + "/generate"
    counter = itertools.count()
    total = len(questions)
    lock = threading.Lock()
    verdicts: dict[str, int] = {}
    errors: list[BaseException] = []

    def post(body: bytes) -> Any:
        response = pool.request("POST", target, body=body, headers=HEADERS, retries=False)
        if response.status != 200:
            raise RuntimeError(f"/generate answered {response.status}")
        return orjson.loads(response.data)

    def worker() -> None:
        try:
            while True:
                index = next(counter)
                if index >= total:
                    return
                prompt = first_prompt(questions[index])
                answer = post(gen_body(prompt))
                prompt += answer["text"] + "\nConfidence:"
                answer = post(gen_body(prompt))
                prompt += answer["text"] + "\nNeeds checking:"
                prefix = post(prefix_body(prompt))
                verdict = decide(post(score_body(prompt, prefix["meta_info"]["prompt_tokens"])))
                with lock:
                    verdicts[verdict] = verdicts.get(verdict, 0) + 1
        except BaseException as exc:  # surfaced after the join
            errors.append(exc)

    cpu0, t0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(min(threads, total))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pool.clear()
    if errors:
        raise errors[0]
    name = f"urllib3, {threads} threads"
    return FloorResult(name, total, seconds, cpu, 4 * total, verdicts)
