"""Two-step few-shot program: a country's capital, then a fact about that capital.

The second generation is conditioned on the first (the generated capital is part of the
prompt when the fact is written), which is what makes this a *program* rather than a
single prompt. All rows share the few-shot prefix, so this program is also a good
benchmark for prefix caching and batching.

    sglrun batch programs/capital_fact.py sample_data/capital_fact.jsonl --id-field id

Produces two variables per row: ``capital`` and ``fact``.
"""

import sglrun as sgl

# Worked examples in exactly the format the program continues.
EXAMPLES = (
    "Country: France\n"
    "Capital: Paris\n"
    "Fact: Paris is home to the Eiffel Tower.\n"
    "\n"
    "Country: Japan\n"
    "Capital: Tokyo\n"
    "Fact: Tokyo is one of the largest cities in the world.\n"
    "\n"
    "Country: Egypt\n"
    "Capital: Cairo\n"
    "Fact: Cairo lies on the banks of the Nile river.\n"
    "\n"
)


@sgl.function
def capital_fact(s, country: str):
    """Generate the capital of ``country`` and then one fact about it."""
    s += EXAMPLES
    s += "Country: " + country + "\n"
    # Step 1: the capital, a few words at most, ending at the newline.
    s += "Capital:" + sgl.gen("capital", stop="\n", max_tokens=8, temperature=0)
    # Step 2: a one-line fact that can refer back to the generated capital.
    s += "\nFact:" + sgl.gen("fact", stop="\n", max_tokens=24, temperature=0)
