"""Fork/join: list a few tips, expand each one in parallel, then summarize.

The SGLang tip-suggestion example, adapted for a tiny chat model:

1. the model lists ``num_tips`` tips about ``topic`` (variable ``tips``);
2. ``s.fork(num_tips)`` makes one copy of the conversation per tip, and each copy asks
   for an explanation of its tip (variable ``expansion`` in each fork). The forks share
   the conversation so far as a prefix and run in parallel;
3. ``forks.join()`` gathers each fork's ``expansion`` back into this state as a list;
4. the expansions are put together into a final prompt for a short summary
   (variable ``summary``).

    sglrun batch programs/tips.py sample_data/tips.jsonl --id-field id

Produces ``tips``, ``expansion`` (a list with one item per tip) and ``summary``.
"""

import sglrun as sgl

MAX_TIPS = 5


@sgl.function
def tips(s, topic: str, num_tips: int = 2):
    """Suggest ``num_tips`` tips about ``topic``, expand each in a fork, then summarize."""
    if not 1 <= num_tips <= MAX_TIPS:
        raise ValueError(f"num_tips must be between 1 and {MAX_TIPS}, got {num_tips}")

    s += sgl.system("You are a helpful assistant. Keep every answer short.")
    s += sgl.user("Give " + str(num_tips) + " short tips about " + topic + ". Number them.")
    s += sgl.assistant(sgl.gen("tips", max_tokens=64, temperature=0))

    # One fork per tip; each fork continues the conversation with its own question.
    forks = s.fork(num_tips)
    # ``forks += f`` appends ``f(i)`` to fork ``i``.
    forks += lambda i: (
        sgl.user("Explain tip " + str(i + 1) + " in one sentence.")
        + sgl.assistant(sgl.gen("expansion", max_tokens=24, temperature=0))
    )

    # Reading a fork's variable waits for that fork to finish.
    expansions = [forks[i]["expansion"] for i in range(num_tips)]
    forks.join()  # copies each fork's ``expansion`` back here, as a list

    details = "\n".join(
        "Tip " + str(i + 1) + ": " + expansion.strip() for i, expansion in enumerate(expansions)
    )
    s += sgl.user(
        "Here are the tips with explanations:\n" + details + "\n\nSum them up in one sentence."
    )
    s += sgl.assistant(sgl.gen("summary", max_tokens=48, temperature=0))
