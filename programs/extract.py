"""Extract facts from a short text with constrained decoding.

Three kinds of constraint, each guaranteeing well-formed output even from a tiny model:

* ``year``: a regular expression, so the answer is always a four-digit year 1900-2099;
* ``age``: ``sgl.gen_int``, so the answer is always an integer;
* ``person``: a JSON schema, so the answer is always a JSON object with a string
  ``name`` and an integer ``age``.

    sglrun batch programs/extract.py sample_data/extract.jsonl --id-field id

Produces three variables per row: ``year``, ``age`` and ``person`` (the JSON text).
"""

import json

import sglrun as sgl

# A four-digit year in the 20th or 21st century.
YEAR_REGEX = r"(19|20)[0-9]{2}"

# The object the last step must produce; ``json_schema`` takes the schema as a string.
PERSON_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
)


@sgl.function
def extract(s, text: str):
    """Extract the year, the person's age, and a {name, age} JSON object from ``text``."""
    s += sgl.system("You extract facts from text. Answer briefly.")
    s += sgl.user("Text: " + text + "\n\nWhich year is mentioned in the text?")
    s += sgl.assistant(sgl.gen("year", regex=YEAR_REGEX, max_tokens=8, temperature=0))

    s += sgl.user("How old is the person in the text? Answer with a number.")
    # gen_int allows trailing whitespace after the digits; stop at the first newline.
    s += sgl.assistant(sgl.gen_int("age", max_tokens=8, stop="\n", temperature=0))

    s += sgl.user('Give the person\'s name and age as JSON, like {"name": "Ann", "age": 30}.')
    s += sgl.assistant(sgl.gen("person", json_schema=PERSON_SCHEMA, max_tokens=48, temperature=0))
