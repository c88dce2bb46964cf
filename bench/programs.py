"""The benchmark's reference program: two ``gen`` calls and one ``select``.

On SGLang's native API it sends four requests per run: one /generate per ``gen``, and for the
``select`` one prefix request (``max_new_tokens=0``) plus one list request scoring both choices.

    sglrun batch bench/programs.py rows.jsonl -o out.jsonl --backend sglang --url URL

This file holds only this one program, so the CLI picks it without a name.
"""

import sglrun as sgl

INSTRUCTIONS = (
    "You are a careful assistant. Answer the question in a few words, then rate how sure you "
    "are, then say whether the answer needs checking by a person.\n"
    "Keep every answer on one line.\n\n"
)


@sgl.function
def reference(s, question: str):
    """Answer, rate the answer, then choose a verdict between two choices."""
    s += INSTRUCTIONS
    s += "Question: " + question + "\n"
    s += "Answer:" + sgl.gen("answer", max_tokens=8, stop="\n")
    s += "\nConfidence:" + sgl.gen("confidence", max_tokens=8, stop="\n")
    s += "\nNeeds checking:" + sgl.select("verdict", choices=[" yes", " no"])


def make_rows(count: int) -> list[dict[str, str]]:
    """``count`` distinct input rows for ``reference``."""
    return [
        {"question": f"What is item number {index} in the catalogue?"} for index in range(count)
    ]
