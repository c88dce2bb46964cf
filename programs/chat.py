"""A multi-turn chat: each user message gets its own assistant reply.

Uses the ``with s.user():`` / ``with s.assistant():`` role scopes and generates the
replies in a loop, one named variable per turn. Every reply sees the whole conversation
so far, so the second message can refer to the first exchange. The optional third
message is skipped when empty.

    sglrun batch programs/chat.py sample_data/chat.jsonl --id-field id

Produces ``answer_1`` and ``answer_2`` per row, and ``answer_3`` when ``third`` is given.
"""

import sglrun as sgl

SYSTEM_PROMPT = "You are a friendly assistant. Reply in one or two short sentences."


@sgl.function
def chat(s, first: str, second: str, third: str = ""):
    """Hold a conversation of two or three user turns."""
    s += sgl.system(SYSTEM_PROMPT)
    messages = [first, second, third]
    for turn, message in enumerate(messages, start=1):
        if not message:
            continue
        with s.user():
            s += message
        with s.assistant():
            s += sgl.gen("answer_" + str(turn), max_tokens=48, temperature=0)
