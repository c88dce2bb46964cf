"""Few-shot question answering in plain completion style (no chat roles).

A handful of ``Q:``/``A:`` examples show the model the expected format; the question is
appended in the same format and the answer is generated up to the end of the line.
Every row shares the same few-shot prefix, so a runtime with prefix caching only
processes it once.

    sglrun batch programs/few_shot_qa.py sample_data/few_shot_qa.jsonl --id-field id

Produces one variable per row: ``answer``.
"""

import sglrun as sgl

# The examples every question is prefixed with: short questions, one-line answers.
EXAMPLES = (
    "Q: What is the capital of France?\n"
    "A: Paris\n"
    "\n"
    "Q: How many legs does a spider have?\n"
    "A: Eight\n"
    "\n"
    "Q: What color is the sky on a clear day?\n"
    "A: Blue\n"
    "\n"
    "Q: What do bees make?\n"
    "A: Honey\n"
    "\n"
)


@sgl.function
def few_shot_qa(s, question: str):
    """Answer ``question`` in one line into the ``answer`` variable."""
    s += EXAMPLES
    s += "Q: " + question + "\n"
    # Stop at the newline that ends the answer line; the stop string itself is not kept.
    s += "A:" + sgl.gen("answer", stop="\n", max_tokens=24, temperature=0)
