"""Summarize a short paragraph in one sentence.

The chat-style "summarize" program from the SGLang frontend documentation, sized for a
tiny chat model: a system prompt, the paragraph in a user turn, and a single generation
in the assistant turn. This is the program ``make demo`` runs.

    sglrun batch programs/summarize.py sample_data/summarize.jsonl --id-field id

Produces one variable per row: ``summary``.
"""

import sglrun as sgl

SYSTEM_PROMPT = "You are a helpful assistant. You write short, accurate summaries."


@sgl.function
def summarize(s, text: str):
    """Summarize ``text`` in one sentence into the ``summary`` variable."""
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user("Summarize the following text in one sentence.\n\n" + text)
    # Greedy decoding (temperature 0) makes the demo output reproducible; 48 tokens is
    # enough for one sentence and keeps a 135M model from rambling.
    s += sgl.assistant(sgl.gen("summary", max_tokens=48, temperature=0))
