"""The benchmark's generation-heavy program (part 8): one long greedy gen per row.

``ignore_eos`` makes every row generate exactly ``TOKENS`` tokens, so tokens per second compare
across runs and against a hand-written loop over the same engine.

    sglrun batch bench/generate.py rows.jsonl -o out.jsonl
"""

import sglrun as sgl

TOKENS = 48


@sgl.function
def story(s, topic: str):
    """Write a short story about the topic."""
    s += sgl.user("Write a short story about " + topic + ".")
    s += sgl.assistant(sgl.gen("story", max_tokens=TOKENS, temperature=0, ignore_eos=True))


TOPICS = ("a cat", "a ship", "a tree", "a robot", "a river", "a castle", "a bird", "a storm")


def make_rows(count: int) -> list[dict[str, str]]:
    return [{"topic": f"{TOPICS[index % len(TOPICS)]} (number {index})"} for index in range(count)]
