"""Classify a short text by sentiment and by topic with ``sgl.select``.

``select`` does not sample free text: it scores each choice as a continuation of the
prompt and keeps the most likely one, so the result is always one of the listed labels,
even with a very small model. Where the choices are scored matters as much as how: right
after a chat template's assistant prefix a 135M model prefers one label whatever the text
(measured: "negative" for 30 of 30 labelled texts, half of them positive), while after a
few-shot ``Sentiment:`` cue it labels 30 of 30 right, and 20 of 20 topics. The space after
the cue belongs to the prompt; select scores the choice's token as the model would write it.

    sglrun batch programs/classify.py sample_data/classify.csv

Produces two variables per row: ``label`` (sentiment) and ``topic``.
"""

import sglrun as sgl

SENTIMENTS = ["positive", "negative", "neutral"]
TOPICS = ["food", "travel", "technology", "sports", "weather", "work", "health"]
EXAMPLES = [
    ("The soup was cold and bland.", "negative", "food"),
    ("Our flight landed early and the views were stunning.", "positive", "travel"),
    ("The meeting moved to Thursday at ten.", "neutral", "work"),
]


@sgl.function
def classify(s, text: str):
    """Pick a sentiment ``label`` and a ``topic`` for ``text``."""
    for example, label, topic in EXAMPLES:
        s += f"Text: {example}\nSentiment: {label}\nTopic: {topic}\n\n"
    s += "Text: " + text + "\nSentiment: " + sgl.select("label", choices=SENTIMENTS)
    s += "\nTopic: " + sgl.select("topic", choices=TOPICS)
