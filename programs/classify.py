"""Classify a short text by sentiment and by topic with ``sgl.select``.

``select`` does not sample free text: it scores each choice as a continuation of the
prompt and keeps the most likely one, so the result is always one of the listed labels,
even with a very small model. Both selections happen inside assistant turns.

    sglrun batch programs/classify.py sample_data/classify.csv

Produces two variables per row: ``label`` (sentiment) and ``topic``.
"""

import sglrun as sgl

SENTIMENTS = ["positive", "negative", "neutral"]
TOPICS = ["food", "travel", "technology", "sports", "weather", "work", "health"]


@sgl.function
def classify(s, text: str):
    """Pick a sentiment ``label`` and a ``topic`` for ``text``."""
    s += sgl.system("You are a text classifier. Answer with a single word.")
    s += sgl.user(
        "Text: " + text + "\n\nIs the sentiment of this text positive, negative or neutral?"
    )
    s += sgl.assistant(sgl.select("label", choices=SENTIMENTS))
    # A second turn in the same conversation: the text is already in the context.
    s += sgl.user("Which topic is the text about? Choose one of: " + ", ".join(TOPICS) + ".")
    s += sgl.assistant(sgl.select("topic", choices=TOPICS))
